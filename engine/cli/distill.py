"""``vidpo preprocess``, ``distill`` and ``distill-eval``: consistency distillation's verbs."""
from __future__ import annotations

from vidpo.cli.common import add_overrides, config_from_args, print_json
from vidpo.config import ConfigError
from vidpo.stages.distill import distill_job
from vidpo.stages.distill_eval import distill_eval_job
from vidpo.stages.preprocess import preprocess_job
from vidpo.stages.preprocess_real import preprocess_real_job
from vidpo.training.modeling import loads_from_directory


def cmd_preprocess(args) -> int:
    cfg = config_from_args(args)
    if not 0 <= args.rank < args.world_size:
        raise ConfigError(f"--rank {args.rank} --world-size {args.world_size}: expected 0 <= rank < world-size")
    if loads_from_directory(cfg):   # a release: its clips, prompts and teacher (vidpo.stages.preprocess_real)
        print_json(preprocess_real_job(cfg, args.out, rank=args.rank, world_size=args.world_size))
    else:
        print_json(preprocess_job(cfg, args.out))
    return 0


def cmd_distill(args) -> int:
    print_json(distill_job(config_from_args(args), args.out, resume=not args.no_resume))
    return 0


def cmd_distill_eval(args) -> int:
    students = {}
    for text in args.student:
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--student '{text}': expected NAME=CHECKPOINT, e.g. --student cd=runs/distill/student")
        students[name] = path
    print_json(distill_eval_job(config_from_args(args), args.out, students, teacher=args.teacher, num=args.num,
                            repeats=args.repeats))
    return 0


def add_distill_verbs(sub) -> None:
    p = sub.add_parser("preprocess", help="teacher ODE steps (+ CFG, motion guidance, inversion) into shards",
                       description="Precompute the teacher's guided solver steps of consistency distillation "
                                   "into --out (resumable: complete shards are skipped).")
    p.add_argument("recipe")
    p.add_argument("--out", required=True, help="data directory (set distill.data to it for training)")
    p.add_argument("--rank", type=int, default=0, help="a release: this process writes shards rank, rank + "
                                                        "world-size, ... (default 0)")
    p.add_argument("--world-size", type=int, default=1, help="a release: processes sharing the shards (default 1)")
    add_overrides(p)
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("distill", help="preprocess -> train the consistency student -> teacher-vs-student table",
                       description="The whole consistency distillation into --out (data/, student/, eval/); "
                                   "resumable.")
    p.add_argument("recipe")
    p.add_argument("--out", required=True)
    p.add_argument("--no-resume", action="store_true")
    add_overrides(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("distill-eval", help="teacher vs students: oracle (95%% CI), motion, ms per clip",
                       description="Score the teacher at distill.teacher_steps and each --student at "
                                   "distill.student_steps on the same seeds; writes a JSON and a Markdown table.")
    p.add_argument("recipe")
    p.add_argument("--out", required=True)
    p.add_argument("--student", action="append", default=[], metavar="NAME=CKPT", help="repeatable")
    p.add_argument("--teacher", help="teacher checkpoint (default distill.teacher)")
    p.add_argument("--num", type=int, help="samples per row (default eval.num_samples)")
    p.add_argument("--repeats", type=int, default=1, help="timing runs per row (best is kept)")
    add_overrides(p)
    p.set_defaults(func=cmd_distill_eval)
