"""A served judge (a VLM over HTTP) as a distillation reward: its scores weight the CD loss of the routed rows.

The weights against a float64 row-by-row reference; the weighted CD loss against the hand-weighted per-row losses
(value and gradient) and through the objective; scoring real encoded clips against the stub server, killed with
SIGKILL mid-pass and rerun (the server counts what is asked again); one round trip against ``transformers serve``
over a tiny LLaVA; and ``vidpo distill`` on the tiny Wan release with a served judge next to a CLIP reward."""
from __future__ import annotations

import base64
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import helpers.vlm_server as stub
import numpy as np
import pytest
import torch
from helpers.video import encode_clip, make_frames
from helpers.vlm_server import FakeVLM, Reply, SchemaError, SeenRequest

from vidpo.config import ConfigError, load_config
from vidpo.labeling.vlm_score import build_score_body, parse_score
from vidpo.objectives import distill as cd
from vidpo.objectives.rewards_served import score_served_judges, served_row_weights, served_weights, weight_stats

REPO = Path(__file__).resolve().parent.parent
RECIPE = "recipes/wan/turbo_tiny_cpu.yaml"
pytestmark = pytest.mark.usefixtures("one_thread")


# ----- the stub server, answering pointwise questions too ------------------------------------------------------------
@dataclass
class ScoreRequest(SeenRequest):
    """A pointwise question: one clip's images (in ``images_a``), no "Video A:" / "Video B:" markers."""

    @property
    def key(self) -> tuple:
        return (self.text, self.images_a[0].tobytes())


_PAIRWISE = stub.parse_request


def parse_score_request(path: str, headers, raw: bytes) -> ScoreRequest:
    """The chat-completions schema checks of the stub, for a question about one clip: text, then its media (PNG /
    JPEG ``image_url`` parts or mp4 ``video_url`` parts), then the answer reminder."""
    if path != "/v1/chat/completions" or not headers.get("Content-Type", "").startswith("application/json"):
        raise SchemaError(f"bad path or Content-Type: {path!r}")
    body = json.loads(raw)
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise SchemaError("body must have a non-empty string 'model'")
    if sum(key in body for key in ("max_tokens", "max_completion_tokens")) != 1:
        raise SchemaError("one 'max_tokens' or 'max_completion_tokens' is required")
    messages = body.get("messages")
    if not isinstance(messages, list) or len(messages) != 1 or messages[0].get("role") != "user":
        raise SchemaError("'messages' must be one user message")
    content = messages[0].get("content")
    texts, images, videos = [], [], 0
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            images.append(stub._decode_image(part["image_url"].get("url", "")))
        elif kind == "video_url":
            images.extend(stub._decode_video(part["video_url"].get("url", "")))
            videos += 1
        else:
            raise SchemaError(f"bad content part {str(part)[:80]}")
    if len(texts) != 2 or not images or content[0].get("type") != "text" or content[-1].get("type") != "text":
        raise SchemaError("expected the question, the clip's media, then the answer reminder")
    return ScoreRequest(headers=dict(headers.items()), body=body, text="\n".join(texts), images_a=images,
                        images_b=[], segment_number=None, videos=videos)


def parse_any(path: str, headers, raw: bytes):
    try:
        content = json.loads(raw)["messages"][0]["content"]
        pairwise = any(isinstance(p, dict) and p.get("text", "").strip() == "Video A:" for p in content)
    except (ValueError, KeyError, IndexError, TypeError):
        pairwise = True   # let the stub's own checks say what is wrong
    return _PAIRWISE(path, headers, raw) if pairwise else parse_score_request(path, headers, raw)


@pytest.fixture(autouse=True)
def pointwise_stub(monkeypatch):
    monkeypatch.setattr(stub, "parse_request", parse_any)


def brightness_score(request: SeenRequest) -> int:
    """1..10 from the clip's mean grey level: a judge whose answer depends on what it was shown."""
    return 1 + int(round(9 * float(np.mean(request.images_a)) / 255.0))


def score_or_verdict(request: SeenRequest) -> Reply:
    if isinstance(request, ScoreRequest):
        if "response_format" in request.body:
            return Reply(text=json.dumps({"score": brightness_score(request)}))
        return Reply(text=f"Score: {brightness_score(request)}")
    return Reply(text=stub.brightness_verdict(request, margin=0.5))


# ----- (1) the weights -------------------------------------------------------------------------------------------
def reference_weights(scores, gammas, routed, counts):
    """Float64, row by row: expand each prompt into its rows, standardise each judge over the routed rows it scored,
    exponentiate, normalise to mean 1 over the routed rows."""
    rows = [p for p in range(len(counts)) for _ in range(int(counts[p]))]
    routed_rows = [p for p in rows if routed[p]]
    log_u = {p: 0.0 for p in range(len(counts))}
    for j, gamma in enumerate(gammas):
        values = [scores[j][p] for p in routed_rows if not math.isnan(scores[j][p])]
        if not values:
            continue
        mu = sum(values) / len(values)
        sd = math.sqrt(sum((v - mu) ** 2 for v in values) / len(values))
        for p in log_u:
            if routed[p] and not math.isnan(scores[j][p]) and sd > 0:
                log_u[p] += gamma * (scores[j][p] - mu) / sd
    mean_u = sum(math.exp(log_u[p]) for p in routed_rows) / len(routed_rows)
    return [math.exp(log_u[p]) / mean_u if routed[p] else 1.0 for p in range(len(counts))], routed_rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weights_match_a_float64_row_by_row_reference(seed):
    g = torch.Generator().manual_seed(seed)
    prompts = 11
    scores = torch.randint(1, 11, (2, prompts), generator=g).double()
    scores[0, 3] = scores[1, 5] = math.nan                  # a clip each judge could not score: neutral
    routed = torch.rand(prompts, generator=g) < 0.7
    routed[[0, 3, 5]] = True
    counts = torch.randint(0, 5, (prompts,), generator=g)
    counts[[0, 3, 5]] = 2
    gammas = [0.7, -0.4]
    got = served_weights(scores, gammas, routed, counts)
    want, routed_rows = reference_weights(scores.tolist(), gammas, routed.tolist(), counts.tolist())
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert got.dtype == torch.float64 and bool((got[~routed] == 1).all())
    row_w = torch.tensor([want[p] for p in routed_rows], dtype=torch.float64)
    assert float(row_w.mean()) == pytest.approx(1.0, abs=1e-12)
    stats = weight_stats(got, routed, counts)
    assert stats["rows"] == len(routed_rows) and stats["mean"] == pytest.approx(1.0, abs=1e-12)
    assert stats["min"] == pytest.approx(float(row_w.min())) and stats["max"] == pytest.approx(float(row_w.max()))
    assert stats["ess"] == pytest.approx(float(row_w.sum() ** 2 / (row_w ** 2).sum()), rel=1e-12)
    # a clip only judge 1 failed to score is weighted by judge 0 alone (z_1 = 0: neutral), not by a score of 0
    z0 = [reference_z(scores[0], routed, counts, p) for p in (0, 5)]
    z1 = reference_z(scores[1], routed, counts, 0)
    assert float(got[5] / got[0]) == pytest.approx(math.exp(0.7 * (z0[1] - z0[0]) - 0.4 * (0.0 - z1)), rel=1e-12)
    # the judge's scale does not matter (standardised), gamma = 0 is the plain loss, a better score weighs more
    torch.testing.assert_close(served_weights(3 * scores + 5, gammas, routed, counts), got, rtol=1e-12, atol=1e-12)
    assert bool((served_weights(scores, [0.0, 0.0], routed, counts) == 1).all())
    one = served_weights(scores[:1], [1.0], routed, counts)
    valid = routed & (counts > 0) & ~torch.isnan(scores[0])
    order = scores[0][valid].argsort()
    assert bool((one[valid][order][1:] >= one[valid][order][:-1]).all())


def reference_z(scores, routed, counts, p):
    values = [float(scores[q]) for q in range(len(counts)) for _ in range(int(counts[q]))
              if routed[q] and not math.isnan(float(scores[q]))]
    mu = sum(values) / len(values)
    sd = math.sqrt(sum((v - mu) ** 2 for v in values) / len(values))
    return (float(scores[p]) - mu) / sd


def test_no_routed_rows_or_constant_scores_give_weight_one():
    counts = torch.tensor([2, 3, 1])
    flat = torch.tensor([[4.0, 4.0, 4.0]])
    assert bool((served_weights(flat, [2.0], torch.tensor([True, True, False]), counts) == 1).all())
    assert bool((served_weights(torch.tensor([[1.0, 9.0, 5.0]]), [2.0], torch.zeros(3, dtype=torch.bool),
                                counts) == 1).all())
    big = served_weights(torch.tensor([[1.0, 10.0, 5.0]]), [400.0], torch.ones(3, dtype=torch.bool), counts)
    assert bool(torch.isfinite(big).all()) and float((big * counts).sum() / counts.sum()) == pytest.approx(1.0)


# ----- (2) the weighted CD loss -----------------------------------------------------------------------------------
class Velocity(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.conv = torch.nn.Conv3d(4, 4, 3, padding=1).to(dtype)

    def forward(self, x, t, cond):
        return self.conv(x) * (1 + t.view(-1, 1, 1, 1, 1)) + cond.view(-1, 1, 1, 1, 1)


@pytest.mark.parametrize("distance", ["huber", "l2"])
def test_weighted_cd_loss_is_the_hand_weighted_per_row_loss(distance):
    torch.manual_seed(0)
    model = Velocity(torch.float64)
    g = torch.Generator().manual_seed(1)
    x_t, x_prev = (torch.randn(5, 4, 3, 4, 5, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([1.0, 0.75, 0.5, 0.5, 0.25], dtype=torch.float64)
    t_prev = t - 0.25
    cond = torch.randn(5, generator=g, dtype=torch.float64)
    w = torch.tensor([0.2, 1.7, 1.0, 0.6, 1.5], dtype=torch.float64)
    loss, _, _ = cd.cd_loss(model, x_t, t, x_prev, t_prev, cond, distance=distance, huber_c=0.01, weight=w)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    per_row = [cd.cd_loss(model, x_t[b:b + 1], t[b:b + 1], x_prev[b:b + 1], t_prev[b:b + 1], cond[b:b + 1],
                          distance=distance, huber_c=0.01)[0] for b in range(5)]
    want = sum(w[b] * per_row[b] for b in range(5)) / 5
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-12)
    for got, ref in zip(grads, want_grads):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    ones, _, _ = cd.cd_loss(model, x_t, t, x_prev, t_prev, cond, distance=distance, huber_c=0.01,
                            weight=torch.ones(5, dtype=torch.float64))
    plain, _, _ = cd.cd_loss(model, x_t, t, x_prev, t_prev, cond, distance=distance, huber_c=0.01)
    assert float(ones.detach()) == pytest.approx(float(plain.detach()), rel=1e-12)


class Rows:
    """Preprocessed rows in memory (the ``DistillData`` interface the objective reads)."""

    def __init__(self, n=6, prompts=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.tensors = {"x_t": torch.randn(n, 4, 3, 4, 4, generator=g),
                        "x_prev": torch.randn(n, 4, 3, 4, 4, generator=g),
                        "t": torch.full((n,), 0.5), "t_prev": torch.full((n,), 0.25),
                        "prompt": torch.arange(n) % prompts, "source": torch.arange(n) % 2}

    def __len__(self):
        return self.tensors["t"].shape[0]

    def rows(self, index):
        return {k: v[index] for k, v in self.tensors.items()}


def test_objective_weights_each_row_by_its_prompt():
    cfg = load_config(RECIPE, ["train.batch_size=5"])
    data = Rows()
    prompt_weights = torch.tensor([0.5, 1.0, 2.25])
    torch.manual_seed(0)
    model = Velocity(torch.float32)
    objective = cd.ConsistencyDistillObjective(cfg, None, data, torch.device("cpu"), condition=lambda ids: ids.float(),
                                               prompt_key="prompt", frames=9, row_weights=prompt_weights)
    batch = objective.micro_batch(0, 0)
    assert torch.equal(batch["cd_weight"], prompt_weights[batch["prompt"]])
    loss, metrics = objective.loss(model, batch)
    per_row = torch.stack([cd.cd_loss(model, batch["x_t"][b:b + 1], batch["t"][b:b + 1], batch["x_prev"][b:b + 1],
                                      batch["t_prev"][b:b + 1], batch["prompt"][b:b + 1].float(), distance="huber",
                                      huber_c=cfg.distill.huber_c)[0] for b in range(5)])
    assert float(loss.detach()) == pytest.approx(float((per_row * batch["cd_weight"]).mean().detach()), rel=1e-5)
    assert metrics["cd_weight_mean"] == pytest.approx(float(batch["cd_weight"].mean()))
    plain = cd.ConsistencyDistillObjective(cfg, None, data, torch.device("cpu"), condition=lambda ids: ids.float(),
                                           prompt_key="prompt", frames=9)
    assert "cd_weight" not in plain.micro_batch(0, 0)


# ----- (3) scoring real clips against the stub server, killed and rerun -----------------------------------------------
def write_clips(root: Path, brightness) -> tuple[list[str], torch.Tensor]:
    """Clips of different brightness (h264, 12 frames of 40 x 48 at 8 fps) and the manifest ``vidpo cache`` reads."""
    rows, ids = [], []
    for i, level in enumerate(brightness):
        frames = np.clip(make_frames(12, 40, 48).astype(np.float64) * level, 0, 255).astype(np.uint8)
        path = encode_clip(root / "videos" / f"c{i}", frames, "h264", fps=8)
        ids.append(f"p{i}")
        rows.append({"clip_id": f"p{i}", "path": str(path), "caption": f"a moving pattern number {i}"})
    (root / "clips").mkdir(parents=True, exist_ok=True)
    (root / "clips" / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ids, torch.tensor([1 if i % 4 else 0 for i in range(len(brightness))])   # 0 = curated, 1 = web


DOMAIN = {"fps": 8.0, "frames": 9, "height": 32, "width": 32}


def judge_overrides(server, kind="video", **fields):
    entry = {"kind": kind, "rule": "served_score", "base_url": server.base_url, "model": "fake-vlm",
             "max_retries": 0, "timeout_s": 30, "concurrency": 2, "image_size": 0, **fields}
    body = ", ".join(f"{k}: {json.dumps(v)}" for k, v in entry.items())
    return [f"reward.models={{judge: {{{body}}}}}", f"reward.{kind}={{judge: 1.0}}"]


SCORE_SCRIPT = """
import json, sys, torch
from types import SimpleNamespace
from vidpo.config import load_config
from vidpo.objectives.rewards_served import score_served_judges
a = json.loads(sys.argv[1])
cfg = load_config(a["recipe"], a["overrides"])
score_served_judges(cfg, a["data"], a["ids"], torch.tensor(a["source"]), SimpleNamespace(**a["domain"]))
"""


def test_scores_survive_a_kill_and_a_rerun_asks_only_the_rest(tmp_path):
    levels = [0.3, 0.5, 0.7, 0.9, 1.1, 1.3, 0.4, 0.6, 0.8, 1.0, 1.2]
    ids, source = write_clips(tmp_path / "data", levels)
    routed_ids = [pid for pid, s in zip(ids, source.tolist()) if s == 1]   # reward.subset: web
    server = FakeVLM()
    release, answered = threading.Event(), []

    def first_answers_then_hang(request):   # k answers, then the server stalls until the client is killed
        if len(server.requests) > 3:
            release.wait(30)
            return Reply(status=503)
        answered.append(request)
        return score_or_verdict(request)
    server.behaviour = first_answers_then_hang
    try:
        overrides = judge_overrides(server)
        args = json.dumps({"recipe": RECIPE, "overrides": overrides, "data": str(tmp_path / "data"), "ids": ids,
                           "source": source.tolist(), "domain": DOMAIN})
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        proc = subprocess.Popen([sys.executable, "-c", SCORE_SCRIPT, args], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        cache = tmp_path / "data" / "served_rewards" / "judge" / "vlm_answers.jsonl"

        def kept():   # whole lines only: the client may be writing the next one
            return cache.read_text().count("\n") if cache.exists() else 0
        # kill once the server hangs on the 4th question and the client has kept the 3 replies it got; the reply
        # to the 3rd question may still be on its way when the 4th arrives (2 in flight), so wait for both
        deadline = time.time() + 60
        while (len(answered) < 3 or len(server.requests) < 4 or kept() < 3) and proc.poll() is None \
                and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        release.set()
        assert len(answered) == 3, proc.stderr.read().decode()[-3000:]
        assert len(cache.read_text().splitlines()) == 3        # each reply was kept as it arrived
        assert not (tmp_path / "data" / "served_rewards" / "scores.json").exists()

        # the rerun asks exactly the questions that got no reply
        server.behaviour = score_or_verdict
        before = len(server.requests)
        cfg = load_config(RECIPE, overrides)
        out = score_served_judges(cfg, tmp_path / "data", ids, source, SimpleNamespace(**DOMAIN))
        asked = server.requests[before:]
        assert len(asked) == len(routed_ids) - 3 == out["judge"]["asked"] and out["judge"]["cached"] == 3
        assert not {r.text for r in asked} & {r.text for r in answered}
        book = json.loads((tmp_path / "data" / "served_rewards" / "scores.json").read_text())["judges"]["judge"]
        assert sorted(book["scores"]) == sorted(routed_ids) and book["problems"] == []
        # the judge saw each clip as decoded for the VAE: 4 of its 9 frames at 32 x 32, in one question
        assert all(len(r.images_a) == 4 and r.images_a[0].shape == (32, 32, 3) for r in asked)
        scores = [book["scores"][pid] for pid in routed_ids]
        levels_routed = [levels[ids.index(pid)] for pid in routed_ids]
        assert np.corrcoef(scores, levels_routed)[0, 1] > 0.9       # brighter clips scored higher
        # a third run asks nothing
        before = len(server.requests)
        again = score_served_judges(cfg, tmp_path / "data", ids, source, SimpleNamespace(**DOMAIN))
        assert len(server.requests) == before and again["judge"]["cached"] == len(routed_ids)
    finally:
        release.set()
        server.close()
    assert not server.schema_errors, server.schema_errors[:3]


def test_failed_and_unparseable_answers_are_problems_with_a_neutral_weight(tmp_path):
    """kind image (3 frames, a JSON schema answer): a clip whose server answer fails and one whose answer is off
    the scale get no score, a listed problem and z = 0; the failed one is asked again next time, the other not."""
    ids, source = write_clips(tmp_path / "data", [0.3, 0.5, 0.7, 0.9, 1.1, 1.3])
    server = FakeVLM()
    bad = {}

    def behaviour(request):
        caption = request.text.split('"')[1]
        if caption.endswith("number 2"):
            return Reply(status=400)
        if caption.endswith("number 5"):
            return Reply(text='{"score": 42}')
        return score_or_verdict(request)
    server.behaviour = behaviour
    try:
        overrides = judge_overrides(server, kind="image", frames=3, answer_format="json_schema", scale=[0, 9],
                                    question='Rate "{caption}" from {low} to {high}.')
        cfg = load_config(RECIPE, overrides + ["reward.subset=all"])
        out = score_served_judges(cfg, tmp_path / "data", ids, source, SimpleNamespace(**DOMAIN))
        assert out["judge"]["scored"] == 4 and out["judge"]["problems"] == 2
        first = server.requests[0].body
        assert first["response_format"]["json_schema"]["schema"]["properties"]["score"] == \
            {"type": "integer", "minimum": 0, "maximum": 9}
        assert all(len(r.images_a) == 1 for r in server.requests)      # one frame a question
        book = json.loads((tmp_path / "data" / "served_rewards" / "scores.json").read_text())["judges"]["judge"]
        assert book["scores"]["p2"] is None and book["status"]["p2"] == "failed"
        assert book["scores"]["p5"] is None and book["status"]["p5"] == "unparseable"
        assert any("'p2'" in m and "HTTP 400" in m for m in book["problems"])
        assert any("'p5'" in m and "no score on the scale 0..9" in m for m in book["problems"])
        assert len(book["answers"]["p0"]) == 3 and book["scores"]["p0"] == pytest.approx(np.mean(book["answers"]["p0"]))
        bad["asked"] = len(server.requests)
        score_served_judges(cfg, tmp_path / "data", ids, source, SimpleNamespace(**DOMAIN))
        again = server.requests[bad["asked"]:]
        assert len(again) == 1 and again[0].text.split('"')[1].endswith("number 2")   # only the failed question

        rows = torch.tensor([0, 1, 2, 3, 4, 5, 0, 2, 5])
        weights, summary = served_row_weights(cfg.reward, tmp_path / "data", ids, source, rows)
        scores = torch.tensor([[math.nan if book["scores"][p] is None else book["scores"][p] for p in ids]])
        want = served_weights(scores, [1.0], torch.ones(6, dtype=torch.bool), torch.bincount(rows, minlength=6))
        torch.testing.assert_close(weights.double(), want, rtol=1e-6, atol=1e-7)
        z = reference_z(scores[0], [True] * 6, torch.bincount(rows, minlength=6), 0)
        assert float(weights[2] / weights[0]) == pytest.approx(math.exp(-z), rel=1e-5)   # z = 0 for a problem clip
        assert summary["neutral_rows"] == 4 and summary["judges"]["judge"]["problems"] == 2
        assert summary["weights"]["mean"] == pytest.approx(1.0, abs=1e-6) and 0 < summary["weights"]["ess"] <= 9
        # another question is another judge: training refuses the old scores, naming the command
        changed = load_config(RECIPE, judge_overrides(server, kind="image", frames=3, answer_format="json_schema",
                                                      scale=[0, 9]) + ["reward.subset=all"])
        with pytest.raises(ConfigError, match="scored with another entry.*vidpo preprocess"):
            served_row_weights(changed.reward, tmp_path / "data", ids, source, rows)
        # ... but how the server is reached is not what it answers
        moved = load_config(RECIPE, judge_overrides(server, kind="image", frames=3, answer_format="json_schema",
                                                    scale=[0, 9], question='Rate "{caption}" from {low} to {high}.',
                                                    concurrency=1, timeout_s=5) + ["reward.subset=all"])
        torch.testing.assert_close(served_row_weights(moved.reward, tmp_path / "data", ids, source, rows)[0], weights)
    finally:
        server.close()
    assert not server.schema_errors, server.schema_errors[:3]


def test_an_unreachable_judge_is_one_error_naming_its_entry(tmp_path):
    import socket

    from vidpo.labeling import ServerUnreachable

    ids, source = write_clips(tmp_path / "data", [0.5, 0.9])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    closed = SimpleNamespace(base_url=f"http://127.0.0.1:{port}/v1")
    cfg = load_config(RECIPE, judge_overrides(closed) + ["reward.subset=all"])
    with pytest.raises(ServerUnreachable, match="reward.models.judge.base_url"):
        score_served_judges(cfg, tmp_path / "data", ids, source, SimpleNamespace(**DOMAIN))


def test_score_replies_and_request_bodies():
    cases = {"7": 7, "**8**.": 8, "Score: 3": 3, '{"score": 10}': 10, "I'd say 6/10.": 6, "<think>2 or 9</think>5": 5,
             "9 out of 10": 9, "11": None, "between 3 and 5": None, "<think>7": None, "0": None, "4.5": None}
    for reply, want in cases.items():
        assert parse_score(reply, 1, 10) == want, reply
    cfg = SimpleNamespace(model="m", temperature=0.0, token_limit_field="max_tokens", max_tokens=8, format="images",
                          answer_format="guided_choice", reasoning_effort=None, thinking_budget=None,
                          enable_thinking=None, extra_body={"seed": 1}, drop_fields=["temperature"])
    body = build_score_body(cfg, "q", ["data:image/png;base64,AAAA"], 1, 5)
    assert body["guided_choice"] == ["1", "2", "3", "4", "5"] and body["seed"] == 1 and "temperature" not in body
    assert [p["type"] for p in body["messages"][0]["content"]] == ["text", "image_url", "text"]


def test_a_served_judge_entry_is_checked_with_one_message_naming_the_field():
    base = "kind: video, rule: served_score, base_url: http://127.0.0.1:1/v1, model: m"
    cases = {"scale: [5, 1]": "reward.models.judge.scale must be two integers",
             "concurency: 2": "reward.models.judge.concurency is not a field of a served judge (did you mean "
                              "'concurrency'?)",
             "question: 'Rate {prompt}'": "reward.models.judge.question must be a text whose placeholders",
             "frames: 0": "reward.models.judge.frames must be positive",
             "timeout_s: soon": "reward.models.judge.timeout_s must be a number"}
    for extra, message in cases.items():
        with pytest.raises(ConfigError) as err:
            load_config(RECIPE, [f"reward.models={{judge: {{{base}, {extra}}}}}"])
        lines = [line for line in str(err.value).splitlines() if "reward.models" in line]
        assert len(lines) == 1 and message in lines[0], str(err.value)
    with pytest.raises(ConfigError, match="reward.models.judge.base_url must start with http"):
        load_config(RECIPE, ["reward.models={judge: {kind: image, rule: served_score, base_url: x, model: m}}"])
    cfg = load_config(RECIPE, [f"reward.models={{judge: {{{base}}}}}", "reward.image={judge: 1.0}"])
    with pytest.raises(ConfigError, match="'judge' is a video-text judge"):
        served_row_weights(cfg.reward, "/nonexistent", [], torch.zeros(0, dtype=torch.long), torch.zeros(0))


# ----- (4) a real server: transformers serve over a tiny LLaVA --------------------------------------------------------
def test_one_score_from_transformers_serve(tmp_path):
    from helpers.llava_serve import TransformersServer, build_tiny_llava, serve_unavailable, token_id

    from vidpo.config import VLMConfig
    from vidpo.labeling.answer_cache import AnswerCache
    from vidpo.labeling.vlm_score import ScoreItem, ServedScorer

    reason = serve_unavailable()
    if reason:
        pytest.skip(reason)
    model_dir = build_tiny_llava(tmp_path / "model")
    server = TransformersServer(model_dir, tmp_path / "serve.log")
    try:
        config = VLMConfig(base_url=server.base_url, model=server.model, timeout_s=60, max_retries=0, max_tokens=1,
                           frames_per_segment=2, image_size=16,
                           extra_body={"logit_bias": {str(token_id(model_dir, "7")): 100.0}})
        scorer = ServedScorer(config, "video", 1, 10, cache=AnswerCache(tmp_path / "answers.jsonl"))
        frames = make_frames(2, 12, 10)
        item = ScoreItem("p0", "a square", "clip-0", frames=frames, seconds=1.0)
        result = scorer.score([item], frames=9)[0]
        assert result.status == "ok" and result.score == 7.0, result
        assert server.log_tail(10 ** 9).count('"POST /v1/chat/completions HTTP/1.1" 200') == 1
        rerun = ServedScorer(config, "video", 1, 10, cache=AnswerCache(tmp_path / "answers.jsonl"))
        assert rerun.score([ScoreItem("p0", "a square", "clip-0")], frames=9)[0].score == 7.0
        assert rerun.client.stats.summary()["requests"] == 0
    finally:
        server.close()


# ----- (5) vidpo distill with a served judge and a CLIP reward --------------------------------------------------------
def test_vidpo_distill_with_a_served_judge(tmp_path, tmp_path_factory):
    pytest.importorskip("diffusers")
    from helpers.pipelines import PROMPTS_FOR_TESTS, make_wan_dir
    from test_distill_real import make_clip_dir

    from vidpo.cli import main as cli

    root = tmp_path_factory.mktemp("served_turbo")
    make_wan_dir(root / "wan", prompts=PROMPTS_FOR_TESTS, num_layers=2)
    rows = []
    for i, text in enumerate(PROMPTS_FOR_TESTS):
        frames = np.clip(make_frames(12, 40, 48).astype(np.float64) * (0.3 + 0.2 * i), 0, 255).astype(np.uint8)
        clip = encode_clip(root / "clips" / f"c{i}", frames, "h264", fps=8)
        rows.append({"id": f"p{i}", "prompt": text, "clip": str(clip), "source": "web" if i % 2 else "curated",
                     **({"split": "heldout"} if i >= 6 else {})})
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    make_clip_dir(root / "clip")
    server = FakeVLM()
    server.behaviour = score_or_verdict
    try:
        judge = judge_overrides(server)
        models = judge[0].replace("reward.models={judge:", f"reward.models={{clip: {{path: {root / 'clip'}, kind: "
                                                           "image, rule: clip_cosine}, judge:")
        items = [f"model.path={root / 'wan'}", f"prompts.path={root / 'prompts.jsonl'}",
                 f"label.vlm.base_url={server.base_url}", "train.num_threads=1", models, judge[1],
                 "reward.image={clip: 1.0}", "distill.num_rows=16", "distill.motion_scale=0.0"]
        out = tmp_path / "turbo"
        assert cli(["distill", RECIPE, "--out", str(out), *[a for i in items for a in ("--set", i)]]) == 0
        summary = json.loads((out / "summary.json").read_text())
        train_ids = json.loads((out / "data" / "meta.json").read_text())["settings"]["prompt_ids"]
        web = [r["id"] for r in rows if r["source"] == "web" and r["id"] in train_ids]
        assert summary["preprocess"]["served_rewards"]["judge"]["scored"] == len(web)
        train = summary["train"]
        assert train["rewards"] == ["clip"]                            # the differentiable reward, as before
        served = train["served_rewards"]
        w = served["weights"]
        assert served["judges"]["judge"]["gamma"] == 1.0 and served["neutral_rows"] == 0
        assert w["rows"] > 0 and w["mean"] == pytest.approx(1.0, abs=1e-6) and w["min"] < 1 < w["max"]
        assert 0 < w["ess"] <= w["rows"] and w["ess_fraction"] == pytest.approx(w["ess"] / w["rows"])
        metrics = [json.loads(line) for line in (out / "student" / "metrics.jsonl").read_text().splitlines()]
        assert any("cd_weight_mean" in m for m in metrics) and any(m.get("reward_rows", 0) > 0 for m in metrics)
        asked = sum(isinstance(r, ScoreRequest) for r in server.requests)
        answers = {stage: (out / stage / "served_rewards" / "judge" / "vlm_answers.jsonl").read_text().splitlines()
                   for stage in ("data", "eval")}
        per_clip = len(answers["data"]) // len(web)
        assert per_clip >= 1 and len(answers["data"]) == per_clip * len(web)   # each web clip asked once
        # The evaluation: the judge scores the teacher's and the student's judged videos (the same mp4s as the
        # VLM judge saw), each once, on its scale; the comparison is over the pairs both of whose videos it scored.
        judged_videos = load_config(RECIPE).eval.judged_videos
        evaluation = summary["eval"]["rewards"]["judge"]
        assert evaluation["pairs"] == judged_videos and evaluation["problems"] == []
        assert 1 <= evaluation["base"] <= 10 and 1 <= evaluation["policy"] <= 10 and "ci95" in evaluation["delta"]
        assert len(answers["eval"]) == 2 * judged_videos * per_clip
        assert asked == len(answers["data"]) + len(answers["eval"])
        assert "clip" in summary["eval"]["rewards"]                    # the local reward model's scores beside it
    finally:
        server.close()
    assert not server.schema_errors, server.schema_errors[:3]


def test_the_pointwise_stub_rejects_a_malformed_question():
    """The test server's pointwise checks can fail: a question without its answer reminder and a broken image."""
    raw = json.dumps({"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "q"}, {"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}}]}]}).encode()
    with pytest.raises(SchemaError):
        parse_score_request("/v1/chat/completions", {"Content-Type": "application/json"}, raw)
