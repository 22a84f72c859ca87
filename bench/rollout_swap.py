"""Weight-swap latency while a generation is in flight (hf backend, real HTTP on loopback).

    .venv/bin/python bench/rollout_swap.py                    # 64 and 4096 new tokens, 5 pushes each
    .venv/bin/python bench/rollout_swap.py --new-tokens 64,1024,4096 --repeats 3

For each length: a request for one sample of `--new-tokens` tokens (no stop token, so it runs to the
end), then `--push-after` seconds later a PUT of the full state dict as the next version. Reported: the
push's latency (client call, end to end), the generation's wall time, and how many pushes returned before
the generation ended. A swap that drains waits for the generation (latency ~ its remaining time); one that
lands between decoding steps does not depend on it. Reads only `policy_version`, so the same script
measures an older tree too (copy it into that tree's bench/ and run it there).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "proto")]

from safetensors.torch import load_file  # noqa: E402

from experiments.tiny_models import make_tiny_llama  # noqa: E402
from services.rollout.app import build_app  # noqa: E402
from services.rollout.client import RolloutClient, state_dict_to_safetensors  # noqa: E402
from services.rollout.config import RolloutConfig  # noqa: E402
from services.rollout.protocol import GenerateRequest  # noqa: E402
from services.rollout.server import running_server  # noqa: E402

TOKEN = "bench-token"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", default="64,4096", help="comma-separated generation lengths")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--push-after", type=float, default=0.02, help="seconds between the request and the push")
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.new_tokens.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        positions = max(lengths) + 64
        a = make_tiny_llama(Path(tmp) / "a", seed=0, max_positions=positions, hidden_size=128, num_layers=4)
        b = make_tiny_llama(Path(tmp) / "b", seed=1, max_positions=positions, hidden_size=128, num_layers=4)
        bodies = [state_dict_to_safetensors(load_file(p / "model.safetensors")) for p in (b, a)]
        cfg = RolloutConfig(model=str(a), port=0, token=TOKEN, dtype="float32")
        with running_server(build_app(cfg)) as url, RolloutClient(url, token=TOKEN, timeout_s=3600) as client:
            client.wait_ready(120)
            prompt = [[5, 6, 7, 8, 9, 10, 11, 12]]
            client.generate(GenerateRequest(prompts=prompt, max_new_tokens=8, stop_token_ids=[]))  # warm-up
            version = client.weights().version
            print(
                f"{'new tokens':>10} {'push median s':>14} {'push max s':>11} {'generation s':>13} {'push first':>11}"
            )
            for n in lengths:
                push_s, gen_s, first = [], [], 0
                for r in range(args.repeats):
                    done: dict[str, float] = {}
                    req = GenerateRequest(prompts=prompt, max_new_tokens=n, seed=r, stop_token_ids=[])

                    def generate(req: GenerateRequest = req, done: dict[str, float] = done) -> None:
                        client.generate(req)
                        done["t"] = time.perf_counter()

                    t0 = time.perf_counter()
                    thread = threading.Thread(target=generate)
                    thread.start()
                    time.sleep(args.push_after)
                    version += 1
                    p0 = time.perf_counter()
                    client.put_weights(bodies[version % 2], version)
                    p1 = time.perf_counter()
                    thread.join()
                    push_s.append(p1 - p0)
                    gen_s.append(done["t"] - t0)
                    first += p1 < done["t"]
                print(
                    f"{n:>10} {statistics.median(push_s):>14.4f} {max(push_s):>11.4f} "
                    f"{statistics.median(gen_s):>13.3f} {first:>8}/{args.repeats}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
