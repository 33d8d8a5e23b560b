"""Stage 2, unified pretraining (docs/design.md §2, §3): next-element prediction over interleaved image-text.

One LLM predicts the next element of a multimodal sequence: a word (cross-entropy on text tokens and
`</s>`) or a visual embedding (ℓ2 regression of the regression head's output). Position t regresses the
embedding at t+1 whenever t+1 is an `<image>` of a regressed image (t = `[IMG]`, `<image>`₁…`<image>`_{N-1});
the targets, detached, depend on the space the decoder is trained on (`target_space`):

- `adapter` (Emu1): the LLM input rows themselves — the adapter's outputs — and also the `[/IMG]` embedding,
  predicted at `<image>`_N (33 positions for N = 32); the head maps D_llm → D_llm;
- `pooled` (Emu2): the adapter's pooled encoder tokens (`adapter.pool`), D_enc wide; `[/IMG]` is not regressed.

Which positions regress, what the LLM reads at a regressed image's rows and how images are generated follow
from the generation head (`regression_head`, `components/heads/`): the papers' `AutoregressiveHead` (above:
t predicts t+1, teacher forcing, predictions fed back) or `QueryHead` (the rows read learned queries and
regress their own targets; an image that opens a document is read, not regressed, since nothing conditions it).
See docs/generation_heads.md.

Loss = text_weight · CE + regression_weight · regression, the regression `objective` being `mse` (the papers'),
`cosine` or `mse+cosine`, in the head's (optionally whitened) space. Target / prediction norms and per-dimension
variances are logged so a collapse to the mean is visible. The encoder is frozen (enforced). Weights come from
a stage-1 checkpoint through an explicit, verified hand-off.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from components.base import PooledAdapter
from components.heads.base import ProjectionHead
from components.losses.regression import OBJECTIVES
from components.losses.text import token_ce
from components.multimodal import image_run_index, placeholder_mask
from emu_lightning.data.layout.sequence import SequenceCollator, pad
from emu_lightning.metrics.registry import MetricStore
from emu_lightning.systems.base import EmuSystem
from emu_lightning.systems.multimodal_eval import MultimodalEval

TARGET_SPACES = ("adapter", "pooled")


class Stage2System(MultimodalEval, EmuSystem):
    """Unified pretraining. Arguments of `EmuSystem`, plus:

    Args:
        regression_head: the generation head (`components/heads/`): LLM width → target width, no bias (Emu1
            D_llm → D_llm; Emu2 `project_down` D_llm → D_enc), plus how it reads, predicts and generates.
        target_space: `adapter` (Emu1) or `pooled` (Emu2); see the module docstring.
        text_weight: weight of the text cross-entropy.
        regression_weight: weight of the regression (the papers do not publish the ratio; 1:1 by default).
        objective: regression loss, one of `mse` (the papers), `cosine`, `mse+cosine`.
        whiten_batches: training batches read at fit start to estimate the head's target whitening (when the
            head has `whiten` and no statistics yet; a resumed run keeps its checkpoint's).
        init_from: stage-1 checkpoint (Lightning `.ckpt` or state dict) to start from; None = fresh weights.
        handoff: target part → source prefix in `init_from`; parts not named (the head) stay fresh.
        shots: few-shot k values evaluated on captioning and VQA sets.
        video_shots: k values evaluated on video QA sets (each video demonstration is 8 image blocks).
        selection: how demonstrations are chosen for k > 0: `random` (seeded) and/or `rices` (nearest images).
        max_new_tokens: longest generated caption; answers get `answer_max_new_tokens`.
        answer_max_new_tokens: longest generated VQA answer (Emu2: 10).
        num_beams: beams of few-shot decoding (docs/design.md §5: 5; 1 = greedy, the CPU default of debug recipes).
        eval_decoder: a trained visual decoder (run directory, checkpoint or `decoder_export` folder) conditioned on
            this model's target space: evaluation then decodes text → image and judges it (`<set>/t2i_*`).
            Frozen and kept out of this system's checkpoint; checked against the head at start-up.
        eval_judge: the frozen scene classifier (safetensors, `benchmarks/scene_classifier.py`) that judges them.
        eval_guidance, eval_sample_steps: sampling of those images (None = the decoder's recipe values).
        decoder_loss: a trained visual decoder run (directory or checkpoint) through which the generated embeddings
            also train: each regressed image's predictions condition the frozen decoder, whose denoising loss
            on the true image (its own schedule and weighting, no condition drop) is added with weight
            `decoder_weight`, so the LLM learns to put what the decoder reads where it reads it (the diffusion
            loss MetaQuery and BLIP3-o train their queries with; docs/generation_heads.md). Frozen and kept out
            of this system's checkpoint; checked against the head at start-up.
        decoder_weight: weight of that loss.
        decoder_t_range: [lo, hi] fractions of the decoder's noise schedule (0 clean, 1 pure noise) to draw that
            loss's timesteps from, weighted equally; None (the default) draws from the whole schedule with the
            decoder's own weighting. The noisy steps are where a sampler commits to layout and shape, and Min-SNR
            weighting all but ignores them (docs/generation_heads.md).
    """

    def __init__(self, *args: Any, regression_head: ProjectionHead, target_space: str = "pooled",
                 text_weight: float = 1.0, regression_weight: float = 1.0, objective: str = "mse",
                 whiten_batches: int = 8, init_from: str | None = None,
                 handoff: dict[str, str] | None = None, shots: list[int] = (0, 2, 4, 8),
                 video_shots: list[int] = (0, 2), selection: list[str] = ("random", "rices"),
                 max_new_tokens: int = 48, answer_max_new_tokens: int = 10, num_beams: int = 1,
                 eval_decoder: str | None = None, eval_judge: str | None = None, eval_guidance: float | None = None,
                 eval_sample_steps: int | None = None, decoder_loss: str | None = None,
                 decoder_weight: float = 1.0, decoder_t_range: list[float] | None = None, **kwargs: Any):
        super().__init__(*args, extra_parts={"regression_head": regression_head}, **kwargs)
        if "encoder" in self.policy.trainable:
            raise ValueError("stage 2 trains with the encoder frozen (docs/design.md §3): remove 'encoder' from "
                             f"policy.trainable={self.policy.trainable}")
        if target_space not in TARGET_SPACES:
            raise ValueError(f"target_space={target_space!r}; expected one of {TARGET_SPACES}")
        if target_space == "pooled" and not isinstance(self.adapter, PooledAdapter):
            raise ValueError(f"target_space='pooled' needs an adapter with pool() and project_up() (Emu2's "
                             f"MeanPoolProjector); {type(self.adapter).__name__} has none: use 'adapter'")
        want = self.llm.hidden_dim if target_space == "adapter" else self.adapter.in_dim
        if regression_head.in_dim != self.llm.hidden_dim or regression_head.out_dim != want:
            raise ValueError(f"regression_head is {regression_head.in_dim}→{regression_head.out_dim}; target_space="
                             f"{target_space!r} needs {self.llm.hidden_dim}→{want}")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r}; expected one of {OBJECTIVES}")
        tokens = getattr(regression_head, "num_tokens", self.adapter.num_tokens)
        if tokens != self.adapter.num_tokens:
            raise ValueError(f"{type(regression_head).__name__} has num_tokens={tokens} queries but the adapter "
                             f"({type(self.adapter).__name__}) gives {self.adapter.num_tokens} tokens per image")
        if getattr(regression_head, "whiten", False) and target_space == "adapter":
            raise ValueError("regression_head.whiten needs fixed targets, but target_space='adapter' regresses the "
                             "adapter's outputs, which train: whiten target_space='pooled' targets only")
        self.target_space, self.text_weight, self.regression_weight = target_space, text_weight, regression_weight
        self.objective, self.whiten_batches = objective, whiten_batches
        self.init_from, self.handoff = init_from, handoff or {"encoder": "encoder", "adapter": "adapter", "llm": "llm"}
        self.shots, self.video_shots, self.selection = list(shots), list(video_shots), list(selection)
        self.max_new_tokens, self.answer_max_new_tokens, self.num_beams = max_new_tokens, answer_max_new_tokens, num_beams
        self.counters = {"truncated": 0, "skipped": 0}
        self.eval_samples: dict[str, list] = {}  # set → [(image, zero-shot caption, reference)] for SampleLog
        self.metrics = MetricStore(self)           # (set, metric, variant) → metric, made on first use
        self.eval_guidance, self.eval_sample_steps = eval_guidance, eval_sample_steps
        self._eval_generation: list = []          # [decoder, judge]: in a list, so neither becomes a submodule
        if bool(eval_decoder) != bool(eval_judge):
            raise ValueError(f"judged text-to-image evaluation needs both eval_decoder and eval_judge; got "
                             f"eval_decoder={eval_decoder!r}, eval_judge={eval_judge!r}")
        if eval_decoder:   # loaded now: a decoder that does not fit stops the run before any data is read
            from emu_lightning.metrics.semantic import load_scene_classifier

            self._eval_generation = [self._frozen_decoder(eval_decoder),
                                     load_scene_classifier(eval_judge).eval().requires_grad_(False)]
        if decoder_weight <= 0:
            raise ValueError(f"decoder_weight={decoder_weight}; expected a positive weight")
        self.decoder_weight = decoder_weight
        if decoder_t_range is not None and not (len(decoder_t_range) == 2
                                                and 0 <= decoder_t_range[0] <= decoder_t_range[1] <= 1):
            raise ValueError(f"decoder_t_range={decoder_t_range}; expected [lo, hi] with 0 <= lo <= hi <= 1")
        self.decoder_t_range = tuple(decoder_t_range) if decoder_t_range is not None else None
        self._decoder_loss: list = []             # [frozen decoder]: in a list, so it never becomes a submodule
        if decoder_loss:   # loaded now: a decoder that does not fit stops the run before any data is read
            from emu_lightning.systems.decoder import DecoderSystem

            decoder = self._frozen_decoder(decoder_loss)
            if not isinstance(decoder, DecoderSystem):
                raise ValueError(f"decoder_loss={decoder_loss!r} is a decoder export; the loss needs a decoder run "
                                 f"(directory or .ckpt), which holds the training noise schedule and weighting")
            self._decoder_loss = [decoder]

    def _frozen_decoder(self, path: str) -> Any:
        """A decoder run or export, frozen in eval mode, refused (naming both sides) unless it is conditioned on
        this model's target space, width and token count."""
        from emu_lightning.inference.infer import load_decoder
        from emu_lightning.systems.decoder import check_pairing

        decoder = load_decoder(path).eval().requires_grad_(False)
        check_pairing(self, decoder.unet, decoder.condition_kind, f"this model ({type(self.regression_head).__name__})")
        return decoder

    def feedback(self, pred: Tensor) -> Tensor:
        """A regressed embedding → the next input embedding (Emu1: itself; Emu2: project_up(project_down(h)))."""
        return self.adapter.project_up(pred) if self.target_space == "pooled" else pred

    def visual_targets(self, feats: Tensor, visual: Tensor) -> Tensor:
        """(n,L,D_enc) encoder tokens, (n,N,D_llm) adapter outputs → (n,N,D_tgt) the `<image>` targets."""
        return self.adapter.pool(feats) if self.target_space == "pooled" else visual

    def loss_terms(self, batch: dict) -> dict[str, Tensor]:
        """The training loss and its named terms, without the per-source breakdown (what a bare loop needs)."""
        return self._forward(batch)[0]

    def losses(self, batch: dict) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
        """Named loss terms of a batch, and per data source."""
        out, (ce, is_text, pos, pred, target) = self._forward(batch)
        return out, self.per_source(batch, ce, is_text, pos, pred, target)

    def _forward(self, batch: dict, own: tuple[Tensor, Tensor] | None = None
                 ) -> tuple[dict[str, Tensor], tuple[Tensor, ...]]:
        """Losses and their pieces. `own` = (P,D_tgt) predictions (regression space) and a (P,) mask: the input
        rows of the regressed `<image>` positions the mask selects read `feedback(prediction)` instead of the
        true embedding."""
        ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
        with torch.no_grad():                                          # frozen encoder (policy-checked)
            feats = self.encoder(pixels) if len(pixels) else None     # (n,L,D_enc)
        D = self.llm.hidden_dim
        visual = self.adapter(feats) if feats is not None else pixels.new_zeros(0, self.num_image_tokens, D)
        embeds = self.embed_multimodal(ids, visual)                    # (B,T,D_llm)
        head = self.regression_head
        rows, target = self.regression_pairs(ids, embeds, feats, visual, batch["regress_images"])
        pos = head.predicting(rows)                                    # (B,T) hidden positions, target order
        inputs = head.read_inputs(embeds, rows & placeholder_mask(ids, self.ids.visual), self.training)
        if own is not None:
            inputs = self._feed_own(inputs, ids, pos, *own)
        hidden, _ = self.llm(inputs, mask)                             # (B,T,D_llm) after the final norm
        ce = token_ce(self.llm.logits(hidden), batch["labels"])        # (B,T-1)
        is_text = batch["labels"][:, 1:] != -100                       # (B,T-1) positions with a CE target
        norm_target = head.normalize(target)                           # (P,D_tgt) regression space
        reg, pred = head.loss(hidden[pos], norm_target, self.objective)
        text = ce[is_text].mean() if is_text.any() else ce.sum() * 0.0
        out = {"text_loss": text, **reg, "loss": self.text_weight * text + self.regression_weight * reg["regression_loss"]}
        if self._decoder_loss and self.training and torch.is_grad_enabled() and len(pred):   # not in no-grad passes
            out["decoder_loss"] = self.loss_through_decoder(ids, rows, head.denormalize(pred), pixels)
            out["loss"] = out["loss"] + self.decoder_weight * out["decoder_loss"]
        out.update(self.collapse_readings(head.denormalize(pred.detach()), target))
        return out, (ce, is_text, pos, pred, norm_target)

    def loss_through_decoder(self, ids: Tensor, rows: Tensor, pred: Tensor, pixels: Tensor) -> Tensor:
        """The frozen `decoder_loss` decoder's denoising loss of each regressed image, conditioned on its (P,D_tgt)
        predictions (target space, in `rows` order); gradients reach the predictions, not the decoder."""
        decoder = self._decoder_loss[0].to(self.device)
        image = image_run_index(ids, self.ids.visual)[rows]           # (P,) image of each row; -1: Emu1's [/IMG]
        keep = image >= 0
        N = self.num_image_tokens
        cond = pred[keep].reshape(-1, N, pred.shape[-1])              # (n,N,D): rows of one image are consecutive
        which = image[keep].reshape(-1, N)[:, 0]                      # (n,) the images they regress
        loss, _ = decoder.diffusion_loss(pixels[which], cond.to(pixels.dtype), denoiser=decoder.denoiser(),
                                         t_range=self.decoder_t_range)
        return loss

    @staticmethod
    def collapse_readings(pred: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Mean ℓ2 norms and mean per-dimension variances of (P,D_tgt) predictions and targets (target space): a
        prediction variance far below the target's is the regression collapsing toward the conditional mean."""
        if len(target) < 2:
            return {}
        p, t = pred.float(), target.detach().float()
        return {"pred_norm": p.norm(dim=-1).mean(), "target_norm": t.norm(dim=-1).mean(),
                "pred_var": p.var(0).mean(), "target_var": t.var(0).mean()}

    def _feed_own(self, embeds: Tensor, ids: Tensor, pos: Tensor, pred: Tensor, chosen: Tensor) -> Tensor:
        """`embeds` with the `<image>` row after each chosen predicting position replaced by `feedback(pred)` (what
        free generation feeds back there), so training sees its own errors in the inputs (see `GenSystem`). Emu1's
        `[/IMG]` prediction is never fed back (generation stops after N), so that row is never replaced."""
        where = pos.nonzero()                                          # (P,2): (row, t) predicts (row, t+1)
        chosen = chosen & placeholder_mask(ids[where[:, 0], where[:, 1] + 1], self.ids.visual)
        rows, cols = where[chosen, 0], where[chosen, 1] + 1
        out = embeds.clone()
        out[rows, cols] = self.feedback(self.regression_head.denormalize(pred[chosen])).to(embeds.dtype)
        return out

    @staticmethod
    def per_source(batch: dict, ce: Tensor, is_text: Tensor, pos: Tensor, pred: Tensor,
                   target: Tensor) -> dict[str, dict[str, Tensor]]:
        """Source name → its detached text CE and regression MSE (only the terms the source has in this batch)."""
        per_source = {}
        rows = pos.nonzero()[:, 0]                                      # (P,) sample of each regressed position
        sq = (pred.detach().float() - target.float()).pow(2).mean(-1)  # (P,)
        for i, name in enumerate(batch["source_names"]):
            mine = batch["source_index"] == i                           # (B,)
            terms = {}
            if is_text[mine].any():
                terms["text_loss"] = ce[mine][is_text[mine]].mean().detach()
            if mine[rows].any():
                terms["regression_loss"] = sq[mine[rows]].mean()
            per_source[name] = terms
        return per_source

    def regression_pairs(self, ids: Tensor, embeds: Tensor, feats: Tensor | None, visual: Tensor,
                         regress: Tensor) -> tuple[Tensor, Tensor]:
        """(B,T) mask of the regressed rows (the `<image>` rows of regressed images, and for Emu1's autoregressive
        head the `[/IMG]` after each) and their (P,D_tgt) targets, in the same row-major order. The head maps the
        rows to the hidden positions that predict them (`predicting`)."""
        run = image_run_index(ids, self.ids.visual)                    # (B,T) image of each <image>, else -1
        if not self.regression_head.feeds_back:
            # A head that replaces the image it regresses reads an image that opens a document instead: nothing
            # conditions it, and the text after it needs to see it (captioning).
            regress = regress.clone()
            opens = run[:, 2][(ids[:, 1] == self.ids.img) & (run[:, 2] >= 0)]
            regress[opens] = False
        regress = torch.cat([regress, regress.new_zeros(1)])           # index -1 (not an image) reads False
        rows = regress[run]                                             # (B,T)
        if self.target_space == "adapter":
            if self.regression_head.feeds_back:
                # Emu1: <image>_N predicts the [/IMG] row as well; targets are the input rows themselves.
                rows = rows.clone()
                rows[:, 1:] |= (ids[:, 1:] == self.ids.img_end) & regress[run[:, :-1]]
            return rows, embeds[rows].detach()                          # (P,D_llm)
        if feats is None:
            return rows, embeds.new_zeros(0, self.regression_head.out_dim)
        targets = self.visual_targets(feats, visual)[regress[:-1]]     # (n_regressed,N,D_enc), reading order
        return rows, targets.reshape(-1, targets.shape[-1]).detach()

    @torch.no_grad()
    def fit_whitening(self) -> None:
        """Estimate the head's target whitening from `whiten_batches` training batches (see `ProjectionHead`)."""
        loader = self.trainer.datamodule.train_dataloader()
        found = []
        for i, batch in enumerate(loader):
            if i >= self.whiten_batches:
                break
            pixels = batch["pixel_values"].to(self.device)
            if not len(pixels):
                continue
            feats = self.encoder(pixels)
            found.append(self.visual_targets(feats, self.adapter(feats))[batch["regress_images"].to(self.device)])
        targets = torch.cat(found).flatten(0, 1) if found else torch.zeros(0)
        if len(targets) < 2:
            raise ValueError(f"whitening found {len(targets)} regressed visual embeddings in {self.whiten_batches} "
                             f"training batches (model.init_args.whiten_batches): the data regresses no images")
        self.regression_head.fit_whitening(targets)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if not self.regression_head.whitening_ready:   # a resumed run already holds its statistics
            self.fit_whitening()

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        losses, per_source = self.losses(batch)
        B = len(batch["ids"])
        self.counters["truncated"] += int(batch["num_truncated"])
        self.log("train/truncated_total", float(self.counters["truncated"]))
        # Documents read (a packed batch's rows hold several) and those read past, by kind: the one skip account.
        documents = int(batch.get("num_documents", B))
        self.count_skips(batch.get("skipped") or {}, documents)
        # What the run has trained on, in documents and non-padding tokens (rows depend on packing): run totals.
        # The datamodule counts the tokens on the CPU before the transfer (no device sync here).
        tokens = batch.get("num_tokens")
        tokens = int((batch["attention_mask"] > 0).sum()) if tokens is None else tokens
        self.counters["documents"] = self.counters.get("documents", 0) + documents
        self.counters["tokens"] = self.counters.get("tokens", 0) + tokens
        self.log_dict({"train/documents_total": float(self.counters["documents"]),
                       "train/tokens_total": float(self.counters["tokens"])})
        loss = self.checked_loss(losses)   # None: non-finite, the step is skipped and counted
        if loss is not None:
            self.log_losses(losses, "train", B)
            for source, terms in per_source.items():
                self.log_losses({f"{source}/{k}": v for k, v in terms.items()}, "train", B)
        return loss

    def collator(self) -> SequenceCollator:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer else None
        return dm.collator() if hasattr(dm, "collator") else SequenceCollator(self.tokenizer, self.num_image_tokens)

    def _prompt(self, docs: list[list[tuple[str, Any]]], suffix: list[int]) -> tuple[Tensor, Tensor]:
        """Left-padded prompt embeddings (B,T,D_llm) and mask of unclosed documents + `suffix` ids."""
        collate = self.collator()
        seqs, images = [], []
        for segs in docs:
            ids, _, ims, _ = collate.encode(segs, close=False, limit=10**9)
            seqs.append(ids + suffix)
            images += ims
        ids, mask = pad(seqs, self.ids.pad, left=True)
        ids, mask = ids.to(self.device), mask.to(self.device)
        visual = (self.encode_images(torch.stack(images).to(self.device)) if images
                  else torch.zeros(0, self.num_image_tokens, self.llm.hidden_dim, device=self.device))
        return self.embed_multimodal(ids, visual), mask

    @torch.no_grad()
    def generate_image_embeddings(self, docs: list[list[tuple[str, Any]]], use_cache: bool = True) -> Tensor:
        """Prompts as segment lists → (B,N,D_tgt) embeddings of the image after `[IMG]` (docs/design.md §5), in the
        target space, by the head's loop."""
        embeds, mask = self._prompt(docs, [self.ids.img])
        return self.regression_head.generate(self.llm, self.feedback, embeds, mask, self.num_image_tokens, use_cache)

    @torch.no_grad()
    def generate_text(self, docs: list[list[tuple[str, Any]]], max_new_tokens: int, num_beams: int = 1) -> list[str]:
        """Prompts as segment lists → generated text, stopped at `</s>` or at a new `[IMG]`."""
        embeds, mask = self._prompt(docs, [])
        out = self.llm.generate(embeds, mask, max_new_tokens=max_new_tokens, num_beams=num_beams,
                                eos_token_id=[self.ids.eos, self.ids.img], pad_token_id=self.ids.pad)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
