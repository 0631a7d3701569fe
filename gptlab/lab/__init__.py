"""The learning lab: what each part of a transformer buys, measured and drawn.

- :mod:`gptlab.lab.ladder`: the ladder from the bigram to GPT, one part per rung, each rung a
  configuration of registered parts; ``gpt ladder`` trains them on one budget and tabulates
  the whole-split val loss of each.
- :mod:`gptlab.lab.attention_maps`: the attention weights of every layer and head of a trained
  model over a prompt, recomputed with the written-out formula (``gpt attention``).
- :mod:`gptlab.lab.commands`: those two commands.

The notebook ``examples/training_lab.ipynb`` climbs the same ladder by hand from
:mod:`gptlab.nn` parts.
"""
