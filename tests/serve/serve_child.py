"""A chat server in a process of its own (`nanopipe.serving.app.serve`, as the serve stage runs it),
for the tests that signal it:

    python tests/serve/serve_child.py PORT gpt|slow [serve.key=value ...]

gpt: the tiny real GPT of test_app's `real` fixture (512-token context, terminators suppressed);
slow: SlowModel (a reply that takes minutes). Exits 0 after a clean shutdown.
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402
from helpers import make_cfg  # noqa: E402
from serve_doubles import ASSISTANT_END, BOS, ChatByteTokenizer, SlowModel, suppress_terminators, tiny_gpt  # noqa: E402


def main():
    port, kind, *overrides = sys.argv[1:]
    torch.set_num_threads(1)
    known = set(make_cfg("experiment=smoke").serve.keys())  # (so that an older schema still starts)
    overrides = [o for o in overrides if o.split("=")[0].split(".")[-1] in known]
    cfg = make_cfg("experiment=smoke", f"serve.port={port}", "serve.temperature=0.0", "serve.max_batch=16",
                   *overrides).serve
    model = (suppress_terminators(tiny_gpt(sequence_len=512, seed=5), [ASSISTANT_END, BOS]) if kind == "gpt"
             else SlowModel())
    from nanopipe.serving.app import serve
    try:
        serve(model, ChatByteTokenizer(), cfg)
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled once it has shut down
        pass


if __name__ == "__main__":
    main()
