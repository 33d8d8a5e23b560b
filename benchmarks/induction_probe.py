"""Can the debug LLM learn in-context copying at all? A text-only check before longer episode runs.

Fast binding (docs/synthetic_world.md, "Episodes") needs the model to copy a nonsense word, 3-5 BPE pieces, from
its demonstration to the answer. Induction heads (Olsson et al. 2022, "In-context learning and induction heads")
are the mechanism small transformers form for that. This trains the debug LLM (`recipes/components/
llm_llama_debug.yaml`: Llama D 256, 4 layers, 4 heads) from random weights on two synthetic token tasks and reports,
every `--eval-every` steps on fresh held-out sequences:

- `copy`: `<s> x1 … xk | x1 … xk`: accuracy of the second half (each xi from a pool of `--pool` token ids); no
  pattern in the data but the repeat, so above 1/pool means copying in context;
- `recall`: `<s> a1 b1 … an bn | aj bj` with fresh random keys and values per sequence (a multi-token value when
  `--value-len` > 1): accuracy of the value tokens after the queried key, chance 1/pool. `--queries Q` (default 1)
  asks Q distinct pairs after the separator, `| aj bj ak bk …`, in random order, and scores every queried value:
  multi-query associative recall (MQAR; Arora et al. 2023, "Zoology: Measuring and improving recall in efficient
  language models"), Q times the supervision per sequence.

Optimisation: AdamW at `--lr`, linear warm-up over `--warmup` steps, then `--schedule constant` (default) or
`cosine` decay to 0 at `--steps`. `--stop-acc A` ends the run at the first evaluation with held-out accuracy ≥ A.

    python benchmarks/induction_probe.py --steps 1500 --threads 2
    python benchmarks/induction_probe.py --task recall --value-len 1 --queries 4 --threads 1 --name mqar_q4_p4

Results merge into `benchmarks/results/induction_probe.json` (key `--name`).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_io import merge_result, run_facts  # noqa: E402

from components.llm.llama import LlamaLM  # noqa: E402

BOS, SEP, FIRST = 1, 2, 10          # ids 10 .. 10 + pool - 1 are the task's tokens


def copy_batch(g: torch.Generator, batch: int, k: int, pool: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,2k+2) ids and a (B,2k+2) mask of the positions whose next token is scored (the copied half)."""
    x = torch.randint(FIRST, FIRST + pool, (batch, k), generator=g)
    ids = torch.cat([torch.full((batch, 1), BOS), x, torch.full((batch, 1), SEP), x], 1)
    scored = torch.zeros_like(ids, dtype=torch.bool)
    scored[:, k + 1:-1] = True           # predicting x1..xk of the second half from the position before each
    return ids, scored


def recall_batch(g: torch.Generator, batch: int, pairs: int, value_len: int, pool: int, queries: int = 1):
    """`<s> (a b…)×pairs | (a_j b_j…)×queries`: the value tokens after each queried key are scored.

    Returns (B, 2 + (pairs + queries)·(1 + value_len)) ids and the mask of positions whose next token is scored.
    """
    if not 1 <= queries <= pairs:
        raise ValueError(f"queries must be in 1..pairs ({pairs}), got {queries}")
    if pairs > pool:
        raise ValueError(f"pairs ({pairs}) needs at least as many distinct keys in the pool ({pool})")
    keys = torch.stack([torch.randperm(pool, generator=g)[:pairs] for _ in range(batch)]) + FIRST     # distinct keys
    values = torch.randint(FIRST, FIRST + pool, (batch, pairs, value_len), generator=g)
    body = torch.cat([keys[..., None], values], -1).reshape(batch, -1)
    if queries == 1:                     # the original single-query task, same random stream
        j = torch.randint(0, pairs, (batch,), generator=g)[:, None]
    else:                                # Q distinct pairs per sequence, in random order
        j = torch.stack([torch.randperm(pairs, generator=g)[:queries] for _ in range(batch)])
    rows = torch.arange(batch)[:, None]
    query = torch.cat([keys[rows, j][..., None], values[rows, j]], -1).reshape(batch, -1)
    ids = torch.cat([torch.full((batch, 1), BOS), body, torch.full((batch, 1), SEP), query], 1)
    scored = torch.zeros_like(ids, dtype=torch.bool)
    start = ids.shape[1] - queries * (1 + value_len)                   # position of the first query key
    for q in range(queries):             # from each key (and earlier value tokens), predict each value token
        at = start + q * (1 + value_len)
        scored[:, at:at + value_len] = True
    return ids, scored


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier on the base learning rate at `step` (1-based): linear warm-up, then constant or cosine to 0."""
    if warmup and step <= warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def loss_and_acc(lm: LlamaLM, ids: torch.Tensor, scored: torch.Tensor) -> tuple[torch.Tensor, float]:
    hidden, _ = lm(lm.embed(ids), torch.ones_like(ids))
    logits = lm.model.lm_head(hidden[:, :-1])                          # (B,T-1,V): position t predicts t+1
    target, mask = ids[:, 1:], scored[:, :-1]
    loss = F.cross_entropy(logits[mask], target[mask])
    acc = (logits[mask].argmax(-1) == target[mask]).float().mean().item()
    return loss, acc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("copy", "recall"), default="copy")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--k", type=int, default=16, help="copy: tokens to copy")
    p.add_argument("--pairs", type=int, default=4, help="recall: key-value pairs per sequence")
    p.add_argument("--value-len", type=int, default=3, help="recall: tokens per value (a nonsense word's pieces)")
    p.add_argument("--queries", type=int, default=1, help="recall: pairs asked (and scored) after the separator")
    p.add_argument("--pool", type=int, default=500)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=0, help="linear learning-rate warm-up steps")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant", help="after warm-up")
    p.add_argument("--stop-acc", type=float, default=None, help="stop at the first evaluation reaching this")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    lm = LlamaLM(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=688, vocab_size=1024)
    opt = torch.optim.AdamW(lm.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.01)
    train_g, eval_g = torch.Generator().manual_seed(a.seed), torch.Generator().manual_seed(10_000 + a.seed)
    batch = (lambda g, n: copy_batch(g, n, a.k, a.pool)) if a.task == "copy" else \
        (lambda g, n: recall_batch(g, n, a.pairs, a.value_len, a.pool, a.queries))
    held_out = [batch(eval_g, 64) for _ in range(4)]                   # the same 256 sequences at every evaluation
    curve, start = {}, time.perf_counter()
    step = 0
    for step in range(1, a.steps + 1):
        for group in opt.param_groups:
            group["lr"] = a.lr * lr_factor(step, a.warmup, a.steps, a.schedule)
        lm.train()
        loss, _ = loss_and_acc(lm, *batch(train_g, a.batch))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        if step % a.eval_every == 0 or step == a.steps:
            lm.eval()
            with torch.no_grad():
                accs = [loss_and_acc(lm, ids, sc)[1] for ids, sc in held_out]
            curve[step] = round(sum(accs) / len(accs), 4)
            print(f"step {step}: train loss {loss.item():.3f}, held-out accuracy {curve[step]:.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
            if a.stop_acc is not None and curve[step] >= a.stop_acc:
                break
    wall = time.perf_counter() - start
    name = a.name or (f"copy_k{a.k}" if a.task == "copy" else
                      f"recall_p{a.pairs}_v{a.value_len}" + (f"_q{a.queries}" if a.queries > 1 else ""))
    entry = {**run_facts(), "task": a.task, "steps": step, "batch": a.batch, "pool": a.pool,
             "chance": round(1 / a.pool, 4), "wall_s": round(wall, 1), "steps_per_s": round(step / wall, 2),
             "heldout_accuracy": curve}
    if a.task == "recall":
        entry.update(pairs=a.pairs, value_len=a.value_len, queries=a.queries)
    entry.update(lr=a.lr, warmup=a.warmup, schedule=a.schedule)
    print(merge_result("induction_probe", name, entry))


if __name__ == "__main__":
    main()
