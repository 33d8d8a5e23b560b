"""Validation and test of the multimodal stages (docs/design.md §6), as a mixin of a system with `losses`,
`generate_text`, `generate_image_embeddings` and `metrics`, its `MetricStore` (`metrics/registry.py`).

Per named evaluation set, logged as `<set>/<metric>`:
- the teacher-forced losses (`text_loss`, `regression_loss`, `regression_cos`) on the set's deterministic layout;
- captioning sets: few-shot CIDEr-D `cider_k{k}_{selection}` (k = 0 logs `cider_k0`), and regression quality
  of free generation — the caption prompts `[IMG]`, N embeddings are generated with the KV cache and compared
  with the encoder's (`gen_cos`, `gen_mse`);
- VQA sets: `vqa_acc_k{k}_{selection}` (the official VQA rules, leave-one-out soft accuracy: `metrics/vqa.py`);
- video sets with questions: `videoqa_acc_k{k}_{selection}`;
- fast-binding episode sets (layout `binding`, `emu_lightning/data/synthetic/episodes.py`): `binding_acc_k{k}` for
  each k of the episodes' `shots`, the first k of the episode's own demonstrations (no pool: a word means something
  only inside its episode), scored by `BindingAccuracy` on the first generated word;
- with `eval_decoder` and `eval_judge` (the system's arguments), every text → image set also decodes the generated
  embeddings and scores the images with the frozen scene judge: `t2i_{color,shape,both,position,empty}`, and
  keeps `eval_images` rows (real | generated) for the image-grid callback; in-context edit items (a source scene
  edited by the instruction, `data/synthetic/edits.py`) are also scored as edits from those same images:
  `edit_{color,shape,both,position,removed,kept}` (`metrics/edit.py`), with a source row above the grid.
Demonstrations come from the datamodule's `demo_pool(<set>)`: seeded random, or RICES by frozen-encoder cosine.
"""
from __future__ import annotations

import torch
from torch import Tensor

from emu_lightning.data.layout.binding import binding_prompt
from emu_lightning.data.layout.fewshot import few_shot_segments, first_answer, random_demos, rices_demos, task_of

# The registered metric (metrics/registry.py) of each few-shot task.
_TASK_METRIC = {"caption": "cider", "vqa": "vqa_acc", "videoqa": "videoqa_acc"}


class MultimodalEval:
    @torch.no_grad()
    def _rices_features(self, samples: list[dict]) -> Tensor:
        """(B,D_enc) frozen-encoder features: mean over tokens (and over frames for videos)."""
        out = []
        for s in samples:
            ims = s["frames"] if "frames" in s else [s["image"]]
            out.append(self.encoder(torch.stack(ims).to(self.device)).mean(dim=(0, 1)))
        return torch.stack(out)

    def _demos(self, name: str, samples: list[dict], k: int, selection: str, max_k: int,
               query_feats: Tensor | None) -> list[list[dict]]:
        if k == 0:
            return [[] for _ in samples]
        pool = self.trainer.datamodule.demo_pool(name)
        if selection == "random":
            return [[pool[i] for i in random_demos(len(pool), k, str(s["id"]), max_k)] for s in samples]
        if selection != "rices":
            raise ValueError(f"demonstration selection {selection!r}; expected 'random' or 'rices'")
        cache = self.__dict__.setdefault("_pool_features", {})  # the encoder is frozen: computed once per pool
        if name not in cache:
            cache[name] = torch.cat([self._rices_features(pool[i:i + 64]) for i in range(0, len(pool), 64)])
        idx = rices_demos(query_feats, cache[name], k)
        return [[pool[i] for i in row.tolist()] for row in idx]

    def _eval_losses(self, batch: dict, name: str) -> None:
        """The teacher-forced loss terms of an evaluation batch, logged under the set's name."""
        losses, _ = self.losses(batch)
        self.log_losses({k: v for k, v in losses.items() if k != "loss"}, name, len(batch["samples"]))

    def _evaluate(self, batch: dict, batch_idx: int, name: str) -> None:
        samples = batch["samples"]
        self._eval_losses(batch, name)
        task = task_of(batch["layout"], samples[0])
        if task is not None:
            metric_name = _TASK_METRIC[task]
            ks = self.video_shots if task == "videoqa" else self.shots
            # Query features once per batch, shared by every k that selects demonstrations by RICES.
            rices = "rices" in self.selection and any(k > 0 for k in ks)
            query_feats = self._rices_features(samples) if rices else None
            for k in ks:
                for selection in ["k0"] if k == 0 else self.selection:
                    demos = self._demos(name, samples, k, selection, max(ks), query_feats)
                    prompts = [few_shot_segments(task, d, q) for d, q in zip(demos, samples)]
                    suffix = f"k{k}" if k == 0 else f"k{k}_{selection}"
                    metric = self.metrics.metric(name, metric_name, suffix)
                    if task == "caption":
                        preds = self.generate_text(prompts, self.max_new_tokens, self.num_beams)
                        metric.update(preds, [s["captions"] for s in samples])
                        if k == 0:  # zero-shot captions for the sample-log callback
                            kept = self.eval_samples.setdefault(name, [])
                            kept += [(s["image"], p, s["captions"][0]) for s, p in zip(samples, preds)][:8 - len(kept)]
                    else:
                        preds = self.generate_text(prompts, self.answer_max_new_tokens, self.num_beams)
                        metric.update([first_answer(p) for p in preds], [s["answers"] for s in samples])
        if batch["layout"] == "binding":
            self._binding_eval(samples, name)
        if batch["layout"] == "pair":  # text → image: regress the image from its caption, compare with the encoder
            self._gen_metric(name, [[("text", s["captions"][0])] for s in samples], batch["pixel_values"],
                             [s.get("scene") for s in samples])

    def _binding_eval(self, samples: list[dict], name: str) -> None:
        """`<name>/binding_acc_k{k}`: the answer generated after the first k demonstrations of each episode, for each
        k of its `shots` (`BindingEpisodes`); episodes without `shots` (`SyntheticEpisodes`) are asked after all
        their demonstrations: `<name>/binding_acc`."""
        shots = samples[0]["episode"].get("shots")
        for k in shots if shots is not None else [None]:
            prompts = [binding_prompt(s, len(s["images"]) - 1 if k is None else k) for s in samples]
            preds = self.generate_text(prompts, self.answer_max_new_tokens, self.num_beams)
            self.metrics.metric(name, "binding_acc", None if k is None else f"k{k}").update(
                preds, [s["answer"] for s in samples])

    def _gen_metric(self, name: str, prompts: list, pixel_values: Tensor, scenes: list | None = None,
                    sources: list | None = None, source_pixels: Tensor | None = None) -> None:
        """`<name>/gen_*`: the embeddings generated from `prompts` (the head's loop) against the regression targets
        of the (B,3,H,W) images they should depict; `<name>/t2i_*` when a decoder and a judge are named, and
        `<name>/edit_*` for the rows whose `sources` entry is the scene an edit started from (None: not an edit);
        `source_pixels` (B,3,H,W), when given, heads the image grid."""
        generated = self.generate_image_embeddings(prompts)                                 # (B,N,D_tgt)
        with torch.no_grad():
            feats = self.encoder(pixel_values.to(self.device))
            target = self.visual_targets(feats, self.adapter(feats))
        self.metrics.metric(name, "gen").update(generated, target)
        decoder, judge = self.eval_generation_parts()
        if decoder is None or not scenes or any(sc is None for sc in scenes):
            return
        from emu_lightning.data.modules.captions import denormalize

        images = decoder.to(self.device).decode(generated, guidance=self.eval_guidance, steps=self.eval_sample_steps,
                                                 generator=torch.Generator().manual_seed(0))      # (B,3,S,S) [0,1]
        self.metrics.metric(name, "t2i", classifier=judge).update(images, scenes)
        edits = [i for i, src in enumerate(sources or []) if src is not None]
        if edits:   # the same images, judged as edits of their sources
            self.metrics.metric(name, "edit", classifier=judge).update(
                images[edits], [scenes[i] for i in edits], [sources[i] for i in edits])
        rows = self.__dict__.setdefault("eval_images", {}).setdefault(name, [])
        if not rows:
            first = [denormalize(source_pixels[:8]).cpu()] if source_pixels is not None else []
            rows += [*first, denormalize(pixel_values[:8]).cpu(), images[:8].cpu()]

    def eval_generation_parts(self) -> tuple:
        """(decoder, judge) for judged text-to-image evaluation, or (None, None): see the system's arguments."""
        parts = getattr(self, "_eval_generation", None)
        return tuple(parts) if parts else (None, None)

