"""The stages of a run, each a function behind a CLI verb, each resumable.

generate.py     ``vidpo generate``: pairs sampled from the policy into shards
label.py        ``vidpo label``: per-segment labels of those pairs (oracle, human file, VLM, critic)
pipeline.py     preference training on labelled pairs, and ``vidpo run``: generate -> label -> train -> eval
jobs.py         ``vidpo train`` / ``sample`` / ``eval`` (every objective)
cache.py        ``vidpo cache``: clips -> VAE latents + text embeddings
prompts.py      the prompt-embedding cache: a prompt set embedded once by the model's text encoder
preprocess.py   ``vidpo preprocess``: the teacher's guided ODE steps for consistency distillation
distill.py      the consistency-distillation job (``vidpo distill``)
distill_eval.py ``vidpo distill-eval``: teacher vs students
compare.py      ``vidpo compare``: recipes x seeds through ``vidpo run``
common.py       logging, sample grids, checkpoint configs and the run report that every job shares
"""
