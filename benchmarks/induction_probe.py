"""Can the debug LLM learn in-context copying at all? A text-only check before longer episode runs.

Fast binding (docs/synthetic_world.md, "Episodes") needs the model to copy a nonsense word, 3-5 BPE pieces, from
its demonstration to the answer. Induction heads (Olsson et al. 2022, "In-context learning and induction heads")
are the mechanism small transformers form for that. This trains the debug LLM (`recipes/components/
llm_llama_debug.yaml`: Llama D 256, 4 layers, 4 heads) from random weights on two synthetic token tasks and reports,
every `--eval-every` steps on fresh held-out sequences:

- `copy`: `<s> x1 … xk | x1 … xk`: accuracy of the second half (each xi from a pool of `--pool` token ids); no
  pattern in the data but the repeat, so above 1/pool means copying in context;
- `recall`: `<s> a1 b1 … an bn | aj bj` with fresh random keys and values per sequence (a multi-token value when
  `--value-len` > 1): accuracy of the value tokens after the queried key, chance 1/pool.

    python benchmarks/induction_probe.py --steps 1500 --threads 2

Results merge into `benchmarks/results/induction_probe.json` (key `--name`).
"""
from __future__ import annotations

import argparse
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


def recall_batch(g: torch.Generator, batch: int, pairs: int, value_len: int, pool: int):
    """`<s> (a b…)×pairs | a_j b_j…`: the value tokens after the queried key are scored."""
    keys = torch.stack([torch.randperm(pool, generator=g)[:pairs] for _ in range(batch)]) + FIRST     # distinct keys
    values = torch.randint(FIRST, FIRST + pool, (batch, pairs, value_len), generator=g)
    body = torch.cat([keys[..., None], values], -1).reshape(batch, -1)
    j = torch.randint(0, pairs, (batch,), generator=g)
    query = torch.cat([keys[torch.arange(batch), j][:, None], values[torch.arange(batch), j]], 1)
    ids = torch.cat([torch.full((batch, 1), BOS), body, torch.full((batch, 1), SEP), query], 1)
    scored = torch.zeros_like(ids, dtype=torch.bool)
    scored[:, -value_len - 1:-1] = True  # from the key (and earlier value tokens), predict each value token
    return ids, scored


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
    p.add_argument("--pool", type=int, default=500)
    p.add_argument("--lr", type=float, default=1e-3)
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
        (lambda g, n: recall_batch(g, n, a.pairs, a.value_len, a.pool))
    held_out = [batch(eval_g, 64) for _ in range(4)]                   # the same 256 sequences at every evaluation
    curve, start = {}, time.perf_counter()
    for step in range(1, a.steps + 1):
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
    wall = time.perf_counter() - start
    name = a.name or (f"copy_k{a.k}" if a.task == "copy" else f"recall_p{a.pairs}_v{a.value_len}")
    entry = {**run_facts(), "task": a.task, "steps": a.steps, "batch": a.batch, "pool": a.pool,
             "chance": round(1 / a.pool, 4), "wall_s": round(wall, 1), "steps_per_s": round(a.steps / wall, 2),
             "heldout_accuracy": curve}
    print(merge_result("induction_probe", name, entry))


if __name__ == "__main__":
    main()
