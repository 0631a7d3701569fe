"""A fuzz test of the checkpoint reader: a seeded mutator over a real checkpoint's fields, and
over files (random bytes, truncations, bit flips, a recompressed archive), each read the way
`gpt sample`, `gpt eval` and `gpt bench generate` read it (``load_model``) and, when that
succeeds and the checkpoint is resumable, the way `gpt run --resume` restores it (a Trainer
built on it). Each case must be a one-line CheckpointError (while resuming: a one-line gptlab
error, e.g. a device not on this machine) or succeed; never another exception. The reader runs
in a subprocess under an address-space limit (``RLIMIT_AS``) of 2 GiB above what it holds once
warmed up, so a forged size cannot take more memory than that (or the host's). Bounded in time
(``GPTLAB_FUZZ_SECONDS``, default 40 s of cases)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from gptlab.core.config import ModelConfig, TrainConfig
from gptlab.core.trainer import Trainer

TEXT = "Prince Andrew looked at Pierre. The old prince was silent, and Natasha laughed.\n" * 40

WORKER = textwrap.dedent(r'''
    import io, json, os, random, resource, sys, time, traceback, zipfile
    import torch
    from gptlab.core.checkpoint import load_checkpoint, load_model
    from gptlab.core.errors import BackendNotSupportedError, CheckpointError, GptlabError
    from gptlab.core.plugins import load_registry
    from gptlab.core.trainer import Trainer

    sources, text_path, work = sys.argv[1].split(","), sys.argv[2], sys.argv[3]
    seconds = float(sys.argv[4])
    text = open(text_path).read()
    reg = load_registry()
    rng = random.Random(21)

    def read(path):
        """What every reader does; returns the phase reached."""
        model, tokenizer, ckpt = load_model(reg, path)
        if ckpt.train_state is None or ckpt.optimizer is None:
            return "sample"
        try:
            Trainer(reg, ckpt.model_config, ckpt.train_config, text, resume=ckpt)
        except CheckpointError:
            raise
        except BackendNotSupportedError as e:  # a header line, the request, the reasons
            return "resume refused"
        except GptlabError as e:
            if "\n" in str(e):
                raise AssertionError(f"resume: a message of several lines: {e}")
            return "resume refused"
        return "resume"

    def vm_kib():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1])

    for source in sources:  # warm up (threads, libraries), then bound the address space
        read(source)
    limit = (vm_kib() + 2 * 1024 * 1024) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    def junk():
        deep = []
        for _ in range(200):
            deep = [deep]
        return rng.choice([
            None, True, False, -1, 0, 1, 3, 2**31, 2**63, -2**70, 10**400, 1e9, 1e300,
            float("nan"), float("inf"), -0.0, "", "x", "\x1b[2J\x1b[31mError: forged\x07",
            "A" * 100_000, "\udcff", [], {}, [1, 2], {"a": 1}, {1: 2}, deep, (1, 2),
            torch.zeros(0), torch.zeros(3), torch.zeros(5056, dtype=torch.uint8),
            torch.zeros(2, 2, dtype=torch.uint8), torch.tensor(float("nan")),
            torch.randn(rng.randint(1, 4), rng.randint(1, 40)), torch.zeros(3, dtype=torch.int64),
            torch.ones(1).expand(10**6), torch.Size([10**9]), torch.device("meta"),
            torch.float16])

    def tweak(value):
        if isinstance(value, torch.Tensor):
            op = rng.randrange(5)
            if op == 0 and value.numel():
                return value.flatten()[: max(1, value.numel() // 2)]
            if op == 1:
                return value.to(rng.choice([torch.float64, torch.float16, torch.int64,
                                            torch.uint8]))
            if op == 2 and value.is_floating_point() and value.numel():
                v = value.clone(); v.view(-1)[0] = float("nan"); return v
            if op == 3:
                return value.unsqueeze(0)
            return torch.cat([value.flatten(), value.flatten()])
        if isinstance(value, bool):
            return not value
        if isinstance(value, int):
            return rng.choice([-value, value + 1, value * 1000, 0, -1, 10**9])
        if isinstance(value, float):
            return rng.choice([-value, value * 1e6, float("nan"), 0.0])
        if isinstance(value, str):
            return rng.choice([value + "x", value[:1], value * 3, "/etc/passwd", "flash-tc",
                               "naive", "rmsnorm", "rotary", "muon", "bigram", "float16",
                               "cuda"])
        return junk()

    def mutate(payload):
        """Change 1 to 3 places of ``payload``: replace, tweak, delete or add."""
        done = []
        for _ in range(rng.randint(1, 3)):
            node, path = payload, []
            while isinstance(node, (dict, list)) and node and (not path or rng.random() < 0.7):
                key = rng.choice(list(node)) if isinstance(node, dict) else \
                    rng.randrange(len(node))
                if not isinstance(node[key], (dict, list)) or not node[key] \
                        or rng.random() < 0.3:
                    break
                node, path = node[key], path + [key]
            if not isinstance(node, (dict, list)) or not node:
                continue
            key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
            op = rng.randrange(4)
            if op == 0:
                node[key] = junk()
            elif op == 1:
                node[key] = tweak(node[key])
            elif op == 2:
                del node[key]
            elif isinstance(node, dict):
                node[rng.choice(["extra", "batch_rng", "n_layer", 7])] = junk()
            else:
                node.append(junk())
            done.append(f"{op}:{'/'.join(map(str, path + [key]))[:80]}")
        return ", ".join(done)

    def forged_file(path, original):
        kind = rng.randrange(5)
        if kind == 0:
            data = os.urandom(rng.choice([0, 1, 7, 512, 4096]))
            what = f"random {len(data)} bytes"
        elif kind == 1:
            cut = rng.randrange(len(original))
            data, what = original[:cut], f"truncated at {cut}"
        elif kind == 2:
            data = bytearray(original)
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            data, what = bytes(data), "bits flipped"
        elif kind == 3:
            buf = io.BytesIO()
            with zipfile.ZipFile(io.BytesIO(original)) as src, \
                    zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as dst:
                for info in src.infolist():
                    dst.writestr(info.filename, src.read(info.filename))
            data, what = buf.getvalue(), "entries compressed"
        else:
            buf = io.BytesIO()
            torch.save(rng.choice([[1, 2], "text", {"format": "gptlab.checkpoint"},
                                   {"format": "gptlab.checkpoint", "version": 2},
                                   torch.zeros(3)]), buf)
            data, what = buf.getvalue(), "another torch file"
        open(path, "wb").write(data)
        return what

    cases, phases, start = 0, {}, time.monotonic()
    while time.monotonic() - start < seconds:
        path = os.path.join(work, f"case{cases % 4}.pt")
        source = rng.choice(sources)
        if rng.random() < 0.2:
            what = forged_file(path, open(source, "rb").read())
        else:
            payload = torch.load(source, weights_only=True)
            try:
                what = mutate(payload)
                torch.save(payload, path)
            except Exception:
                continue  # a change torch cannot make or save (so no file can hold it)
        cases += 1
        try:
            phase = read(path)
        except CheckpointError as e:
            phase = "refused"
            message = str(e)
            if "\n" in message or len(message) > 600:
                print(json.dumps({"case": what, "error": "not one line: " + message[:600]}))
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            print(json.dumps({"case": what, "error": "".join(
                traceback.format_exception(type(e), e, e.__traceback__)[-3:])[-1500:]}))
            phase = "failed"
        phases[phase] = phases.get(phase, 0) + 1
    print(json.dumps({"cases": cases, "phases": phases}))
''')


@pytest.fixture(scope="module")
def checkpoints(registry, tmp_path_factory):
    """Resumable checkpoints of two tiny runs (GPT-2's parts and AdamW; RMSNorm, rotary,
    SwiGLU and Muon), and their text."""
    folder = tmp_path_factory.mktemp("fuzz")
    text = folder / "text.txt"
    text.write_text(TEXT)
    mc = ModelConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, attention="naive",
                     kernels="torch")
    tc = TrainConfig(max_iters=2, batch_size=4, eval_interval=100, eval_iters=1,
                     final_eval_iters=1, warmup_iters=1)
    variants = {"gpt2": (mc, tc),
                "parts": (ModelConfig(**{**mc.to_dict(), "norm": "rmsnorm", "mlp": "swiglu",
                                         "position": "rotary", "untied_head": True}),
                          TrainConfig(**{**tc.to_dict(), "optimizer": "muon"}))}
    for name, (m, t) in variants.items():
        Trainer(registry, m, t, TEXT, out_dir=folder / name, data_source=str(text)).fit()
    return [folder / name / "ckpt.pt" for name in variants], text


def test_the_checkpoint_reader_refuses_in_one_line_or_reads(checkpoints, tmp_path):
    paths, text = checkpoints
    seconds = os.environ.get("GPTLAB_FUZZ_SECONDS", "40")
    proc = subprocess.run([sys.executable, "-c", WORKER, ",".join(map(str, paths)), str(text),
                           str(tmp_path), seconds], capture_output=True, text=True,
                          timeout=float(seconds) + 240,
                          env={**os.environ, "GPTLAB_AUTO": "priority"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    summary = records.pop()
    print(json.dumps(summary))  # shown with pytest -s: how many cases, how far each got
    failures = [r for r in records if "error" in r]
    assert not failures, json.dumps(failures[:5], indent=1)
    phases = summary["phases"]
    # it fuzzed: many cases, most refused, and some read through to a resumed Trainer
    assert summary["cases"] >= 150, summary
    assert phases.get("refused", 0) >= 50 and phases.get("resume", 0) >= 5, summary
