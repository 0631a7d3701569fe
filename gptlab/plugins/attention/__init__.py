"""Built-in attention backends: ``naive`` (written out) and ``sdpa`` (torch's, the reference peer)."""

from gptlab import hookimpl
from gptlab.plugins.attention.naive import NaiveAttention
from gptlab.plugins.attention.sdpa import SdpaAttention


@hookimpl
def register_attention_backends():
    return [NaiveAttention, SdpaAttention]
