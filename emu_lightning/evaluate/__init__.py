"""Evaluation on the papers' benchmark files (docs/evaluation.md): `python -m emu_lightning.evaluate <task>`.

- `cli.py`: the command, one subcommand per protocol;
- `model.py`: a trained system behind the papers' prompts (`data/layout/fewshot.py`);
- `runs.py`: the generation loop with k demonstrations per query;
- `captioning.py`, `vqa.py`: result files in the official formats and their scores;
- `generation.py`: GenEval, DPG-Bench and COCO-FID sample folders;
- `lmms.py`: the lmms-eval model plug-in (`lmms-eval --model emu_lightning`, the `[lmms]` extra).
"""
