"""Teacher service benchmark: transport overhead, dynamic batching gain, bytes on the wire.

    python bench/teacher_throughput.py [--device cpu|cuda] [--hidden 256 --layers 4 --vocab 8000]

Model: a random Llama (hidden 256, 4 layers, head_dim 64) with an 8000-word WordLevel tokenizer built
here, saved in HF format and loaded by the real HFScorer. Servers run in this process (`run_server` on
loopback, the same scorer object), clients are `TeacherClient`s on their own channels.

(1) service / in-process: 4 concurrent clients each send requests of 8 sequences (prompt 64 + completion
    192 tokens, score_from = 64, K = 32); scored tokens/s through gRPC divided by the scorer's tokens/s on
    the same forwards called directly (max_batch_tokens = one request, so both run identical forwards).
    Target >= 0.9.
(2) batching on / off: 16 concurrent clients each sending single sequences (96 tokens, 64 scored);
    "off" = one sequence per forward (max_batch_tokens = the sequence), "on" = default window and budget.
    Target >= 3x. The gain comes from the device: a GPU runs one short sequence far below its capacity, a
    CPU is already compute-bound at ~100 tokens; so the scorer's own batched/unbatched ratio is printed too.
(3) bytes on the wire per scored position at K = 32, counted by a TCP proxy between client and server
    (both directions, all HTTP/2 framing included), on the workload of (1). Target <= 8 K + 16.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "proto"))

from opd_teacher_client import TeacherClient  # noqa: E402

from experiments.tiny_models import save_model, tiny_llama_config  # noqa: E402
from services.teacher.config import TeacherConfig  # noqa: E402
from services.teacher.scorer import HFScorer, ScoreItem  # noqa: E402
from services.teacher.server import run_server  # noqa: E402

console = Console()


def make_model(out: Path, vocab: int, hidden: int, layers: int, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = {w: i for i, w in enumerate(specials + [f"w{i}" for i in range(vocab - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    config = tiny_llama_config(
        vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=hidden // 64,
        max_positions=1024,
        tokenizer=tokenizer,
    )
    torch.manual_seed(seed)
    save_model(LlamaForCausalLM(config), tokenizer, out)
    return out


class CountingProxy:
    """TCP proxy on loopback that counts the bytes it forwards in each direction."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.up = self.down = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, "down"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
                with self._lock:
                    setattr(self, direction, getattr(self, direction) + len(data))
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        for s in self._sockets:
            s.close()


def make_requests(rng, vocab: int, count: int, seqs: int, length: int) -> list[list[list[int]]]:
    return [[rng.integers(4, vocab, length).tolist() for _ in range(seqs)] for _ in range(count)]


def run_clients(
    address: str, jobs: list[list[list[int]]], score_from: int, top_k: int, clients: int, label: str
) -> float:
    """Send `jobs` (each a list of sequences = one score() call) from `clients` threads; returns seconds."""
    queues = [jobs[i::clients] for i in range(clients)]
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(label, total=len(jobs))

        def worker(batch):
            with TeacherClient(address) as c:
                c.info()
                for job in batch:
                    c.score(job, [score_from] * len(job), top_k=top_k)
                    progress.advance(task)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(worker, queues))
        return time.perf_counter() - t0


def bench_transport(args, scorer: HFScorer, model: Path) -> tuple[list[float], list[float], float]:
    """(1) and (3). Direct and service runs alternate, so load from elsewhere on the machine hits both."""
    rng = np.random.default_rng(0)
    length, score_from, seqs = 256, 64, 8
    jobs = make_requests(rng, args.vocab, args.requests, seqs, length)
    rows = len(jobs) * seqs * (length - score_from)
    # In-process: the same forwards (one request per forward), called directly.
    items = [[ScoreItem(np.asarray(s, dtype=np.int32), score_from, args.top_k) for s in job] for job in jobs]
    cfg = TeacherConfig(
        model=str(model),
        port=0,
        device=args.device,
        max_batch_tokens=seqs * length,
        max_sequence_tokens=length,
        max_top_k=args.top_k,
    )
    direct, service = [], []
    with run_server(cfg, scorer=scorer) as handle:
        run_clients(handle.address, jobs[:4], score_from, args.top_k, 4, "warm-up")
        for r in range(args.rounds):
            t0 = time.perf_counter()
            for batch in items:
                scorer.score(batch)
            direct.append(rows / (time.perf_counter() - t0))
            seconds = run_clients(
                handle.address, jobs, score_from, args.top_k, 4, f"service, 4 clients ({r + 1})"
            )
            service.append(rows / seconds)
        proxy = CountingProxy(handle.port)
        wire_jobs = jobs[: max(4, len(jobs) // 4)]
        run_clients(
            f"127.0.0.1:{proxy.port}", wire_jobs, score_from, args.top_k, 4, "through the byte counter"
        )
        proxy.close()
        wire = (proxy.up + proxy.down) / (len(wire_jobs) * seqs * (length - score_from))
    return service, direct, wire


def bench_batching(args, scorer: HFScorer, model: Path) -> tuple[list[float], list[float], list[float]]:
    """(2). Off: one sequence per forward (budget = one sequence, no window); on: the default budget/window."""
    rng = np.random.default_rng(1)
    length, score_from, clients = 96, 32, 16
    jobs = make_requests(rng, args.vocab, args.single_requests, 1, length)
    rows = len(jobs) * (length - score_from)
    rates: dict[str, list[float]] = {"off": [], "on": [], "ceiling": []}
    # The device's own gain from batching: 16 forwards of one sequence vs one forward of 16, no service.
    items = [ScoreItem(np.asarray(job[0], dtype=np.int32), score_from, args.top_k) for job in jobs[:clients]]
    scorer.score(items)
    singles, batched = [], []
    for _ in range(2 * args.rounds):
        t0 = time.perf_counter()
        for it in items:
            scorer.score([it])
        t1 = time.perf_counter()
        scorer.score(items)
        singles.append(t1 - t0)
        batched.append(time.perf_counter() - t1)
    rates["ceiling"].append(min(singles) / min(batched))  # best times: least disturbed by other load
    for r in range(args.rounds):
        for mode, budget, window in (("off", length, 0.0), ("on", 16384, 5.0)):
            cfg = TeacherConfig(
                model=str(model),
                port=0,
                device=args.device,
                max_batch_tokens=budget,
                max_sequence_tokens=length,
                batch_window_ms=window,
                max_top_k=args.top_k,
            )
            with run_server(cfg, scorer=scorer) as handle:
                run_clients(handle.address, jobs[:clients], score_from, args.top_k, clients, "warm-up")
                label = f"batching {mode}, {clients} clients ({r + 1})"
                rates[mode].append(
                    rows / run_clients(handle.address, jobs, score_from, args.top_k, clients, label)
                )
    return rates["on"], rates["off"], rates["ceiling"]


def fmt(rates: list[float]) -> str:
    return ", ".join(f"{x:,.0f}" for x in rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--requests", type=int, default=16, help="(1): requests of 8 x 256 tokens per round")
    p.add_argument("--single-requests", type=int, default=160, help="(2): single-sequence requests per round")
    p.add_argument(
        "--rounds", type=int, default=3, help="measurements alternate; the best of each is reported"
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with TemporaryDirectory(prefix="opd-bench-teacher-") as tmp:
        model = make_model(Path(tmp) / "model", args.vocab, args.hidden, args.layers)
        scorer = HFScorer(str(model), device=args.device, dtype="float32")
        console.print(
            f"model: Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
            f"device {scorer.device}, torch threads {torch.get_num_threads()}; best of {args.rounds} rounds"
        )
        service, direct, wire = bench_transport(args, scorer, model)
        on, off, ceiling = bench_batching(args, scorer, model)
    k = args.top_k
    print(
        f"(1) service {max(service):,.0f} scored tok/s (4 clients, K={k}) / in-process {max(direct):,.0f} tok/s "
        f"= {max(service) / max(direct):.3f}  (target >= 0.9)   rounds: service [{fmt(service)}], "
        f"in-process [{fmt(direct)}]"
    )
    print(
        f"(2) batching on {max(on):,.0f} tok/s / off {max(off):,.0f} tok/s (16 single-sequence clients) "
        f"= {max(on) / max(off):.2f}x  (target >= 3x)   rounds: on [{fmt(on)}], off [{fmt(off)}]"
    )
    print(
        f"    scorer alone, no service: 16 forwards of 1 sequence / 1 forward of 16 = {max(ceiling):.2f}x "
        "(the most batching can give on this device)"
    )
    print(
        f"(3) bytes on the wire per scored position at K={k}: {wire:.1f}  (target <= 8*K+16 = {8 * k + 16})"
    )


if __name__ == "__main__":
    main()
