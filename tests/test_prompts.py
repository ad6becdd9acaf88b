"""Prompt sets (vidpo.data.prompts) and the prompt-embedding cache (vidpo.stages.prompts): parsing of text and
JSONL prompt files, one file:line error per kind of bad input, the split by id, and the cache against a tiny
random T5 encoder built offline (equal to a direct encode, resumable, refusing other settings, shared)."""
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from vidpo.utils.provenance import SettingsMismatch

pytest.importorskip("transformers")

from vidpo.config import ConfigError, PromptsConfig, RunConfig, explain, load_config  # noqa: E402
from vidpo.data.prompts import (  # noqa: E402
    Prompt,
    PromptEmbeddings,
    PromptError,
    PromptSet,
    heldout_score,
    prompt_id,
    read_prompt_file,
)
from vidpo.models.text_encoder import TextEncoder  # noqa: E402
from vidpo.stages.prompts import (  # noqa: E402
    embed_prompts,
    encode_prompts,
    load_prompts,
    negative_texts,
)

PROMPTS = ["a red square moving left", "a blue circle moving up", "a green square moving right",
           "the red circle moving down", "a cat jumps onto a table"]
NEGATIVES = ["blurry static frames", "low quality"]
LENGTH = 8


def _tiny_encoder(root: Path) -> Path:
    """A one-layer random T5 encoder and a word-level tokenizer, saved with save_pretrained (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    torch.manual_seed(0)
    words = ["<pad>", "</s>", "<unk>"] + sorted({w for c in PROMPTS + NEGATIVES for w in c.split()})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(root / "t5")
    T5EncoderModel(T5Config(vocab_size=len(words), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).save_pretrained(root / "t5")
    return root / "t5"


class CountingEncoder:
    """A TextEncoder that records the prompts it was asked to encode."""

    def __init__(self, inner: TextEncoder):
        self.inner, self.seen = inner, []
        self.max_length, self.class_name, self.model, self.tokenizer = (inner.max_length, inner.class_name,
                                                                        inner.model, inner.tokenizer)

    def encode(self, texts):
        self.seen.extend(texts)
        return self.inner.encode(texts)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    directory = _tiny_encoder(tmp_path_factory.mktemp("t5"))
    return TextEncoder(directory, directory, torch.device("cpu"), torch.float32, LENGTH)


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _prompt_set(tmp_path: Path) -> PromptSet:
    """Five prompts, the second and fourth with negative prompts of their own (one shared by both)."""
    rows = [{"id": f"q{i}", "prompt": text} for i, text in enumerate(PROMPTS)]
    rows[1]["negative_prompt"] = NEGATIVES[0]
    rows[3]["negative_prompt"] = NEGATIVES[0]
    rows[4]["negative_prompt"] = NEGATIVES[1]
    return read_prompt_file(_jsonl(tmp_path / "prompts.jsonl", rows))


def _cfg(*extra):
    return load_config(None, ["prompts.shard_size=2", "prompts.batch_size=3", "prompts.dtype=float32",
                              "prompts.negative_prompt=low quality", "train.progress=false", *extra])


# ----- parsing ------------------------------------------------------------------------------------------
def test_text_file_ids_come_from_the_text_and_survive_edits(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("  a red square moving left \n" + "\n".join(PROMPTS[1:]) + "\n\n\n")  # trailing blanks are fine
    ps = read_prompt_file(path)
    assert ps.texts == PROMPTS and ps.ids == [prompt_id(t) for t in PROMPTS]
    assert prompt_id(PROMPTS[0]) == "p" + hashlib.sha1(PROMPTS[0].encode()).hexdigest()[:16]
    assert ps[ps.ids[2]] is ps[2] and ps[2].where == f"{path}:3" and ps[2].negative_prompt is None
    assert ps.ids[0] in ps and "nope" not in ps and ps.source == path
    with pytest.raises(KeyError, match="no prompt with id 'nope'"):
        ps["nope"]
    # Lines added before, or the order changed: every prompt keeps its id.
    path.write_text("a new first prompt\n" + "\n".join(reversed(PROMPTS)) + "\n")
    moved = read_prompt_file(path)
    assert {p.text: p.id for p in moved} == {p.text: p.id for p in ps} | {"a new first prompt": moved.ids[0]}


def test_jsonl_keys_negative_prompts_clips_and_defaults(tmp_path):
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "cat.mp4").write_bytes(b"x")
    absolute = tmp_path / "abs.mp4"
    absolute.write_bytes(b"y")
    path = _jsonl(tmp_path / "p.jsonl", [
        {"id": "cat", "prompt": "a cat", "negative_prompt": "blurry", "clip": "clips/cat.mp4", "source": "vbench"},
        "",
        {"prompt": "a dog", "clip": str(absolute), "split": "heldout", "negative_prompt": None},
    ])
    ps = read_prompt_file(path)
    cat, dog = ps
    assert (cat.id, cat.text, cat.negative_prompt, cat.clip) == ("cat", "a cat", "blurry",
                                                                  (tmp_path / "clips" / "cat.mp4").resolve())
    assert cat.extra == {"source": "vbench"} and cat.split is None and cat.where == f"{path}:1"
    assert (dog.id, dog.negative_prompt, dog.clip, dog.split, dog.where) == (
        prompt_id("a dog"), None, absolute.resolve(), "heldout", f"{path}:3")
    assert ps.get(["cat"]) == [cat] and ps.subset([dog.id]).ids == [dog.id]


@pytest.mark.parametrize("suffix,lines,line,message", [
    (".txt", ["a cat", "", "a dog"], 2, "empty line"),
    (".txt", ["a cat", "a dog", " a cat"], 3, "duplicate prompt, the same text as line 1"),
    (".jsonl", ['{"prompt": "a"}', '{"prompt": "b"'], 2, "not valid JSON"),
    (".jsonl", ['["a cat"]'], 1, "expected a JSON object, got list"),
    (".jsonl", ['{"id": "a", "prompt": "x"}', '{"id": "b"}'], 2, "missing key 'prompt'"),
    (".jsonl", ['{"prompt": 3}'], 1, "'prompt' must be a string, got int 3"),
    (".jsonl", ['{"prompt": "  "}'], 1, "'prompt' is empty"),
    (".jsonl", ['{"id": 7, "prompt": "a"}'], 1, "'id' must be a non-empty string, got 7"),
    (".jsonl", ['{"prompt": "a", "negative_prompt": ["x"]}'], 1, "'negative_prompt' must be a string, got list"),
    (".jsonl", ['{"id": "a", "prompt": "x"}', '{"id": "b", "prompt": "y"}', '{"id": "a", "prompt": "z"}'], 3,
     "duplicate id 'a' (first at line 1)"),
    (".jsonl", ['{"prompt": "a"}', '{"prompt": "a"}'], 2, "duplicate id 'p"),
    (".jsonl", ['{"prompt": "a", "clip": "missing.mp4"}'], 1, "clip 'missing.mp4' does not exist"),
    (".jsonl", ['{"prompt": "a", "negative_promt": "x"}'], 1,
     "unknown key 'negative_promt' (did you mean 'negative_prompt'?)"),
    (".jsonl", ['{"prompt": "a", "split": "test"}'], 1, "'split' must be one of ['train', 'heldout']"),
])
def test_each_bad_line_is_one_error_naming_file_and_line(tmp_path, suffix, lines, line, message):
    path = tmp_path / f"prompts{suffix}"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(PromptError) as info:
        read_prompt_file(path)
    assert str(info.value).startswith(f"{path}:{line}: ") and message in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(PromptError, match="prompt file not found"):
        read_prompt_file(tmp_path / "none.txt")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(PromptError, match=r"empty.jsonl: no prompts"):
        read_prompt_file(tmp_path / "empty.jsonl")
    (tmp_path / "latin1.txt").write_bytes("a cat\nun caf\xe9\n".encode("latin-1"))
    with pytest.raises(PromptError, match=r"latin1.txt:2: not valid UTF-8"):
        read_prompt_file(tmp_path / "latin1.txt")
    with pytest.raises(PromptError, match="duplicate id 'a'"):
        PromptSet([Prompt("a", "x"), Prompt("a", "y")])


# ----- the split ----------------------------------------------------------------------------------------
def test_split_is_by_id_deterministic_and_stable_under_appending(tmp_path):
    texts = [f"prompt number {i}" for i in range(3000)]
    path = tmp_path / "p.txt"
    path.write_text("\n".join(texts[:2000]) + "\n")
    ps = read_prompt_file(path)
    train, held = ps.split(0.1)
    assert len(train) + len(held) == 2000 and 150 < len(held) < 250  # ~200 expected, sd ~13
    assert set(train.ids).isdisjoint(held.ids) and train.ids == [i for i in ps.ids if i not in set(held.ids)]
    assert all(heldout_score(i) < 0.1 for i in held.ids) and all(heldout_score(i) >= 0.1 for i in train.ids)
    assert read_prompt_file(path).split(0.1)[1].ids == held.ids  # the same on a second read

    path.write_text("\n".join(texts) + "\n")  # 1000 prompts appended
    train2, held2 = read_prompt_file(path).split(0.1)
    assert set(held2.ids) & set(ps.ids) == set(held.ids) and set(train2.ids) & set(ps.ids) == set(train.ids)
    assert set(held.ids) <= set(ps.split(0.3)[1].ids)  # a larger fraction only moves prompts to held-out
    assert len(ps.split(0.0)[1]) == 0
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ps.split(1.0)


def test_a_jsonl_split_key_overrides_the_hash(tmp_path):
    rows = [{"id": f"x{i}", "prompt": f"prompt {i}"} for i in range(50)]
    by_hash = {r["id"] for r in rows if heldout_score(r["id"]) < 0.5}
    first_train = next(r for r in rows if r["id"] not in by_hash)
    first_held = next(r for r in rows if r["id"] in by_hash)
    first_train["split"], first_held["split"] = "heldout", "train"
    _, held = read_prompt_file(_jsonl(tmp_path / "p.jsonl", rows)).split(0.5)
    assert set(held.ids) == by_hash - {first_held["id"]} | {first_train["id"]}
    assert read_prompt_file(tmp_path / "p.jsonl").split(0.0)[1].ids == [first_train["id"]]


# ----- the config section -------------------------------------------------------------------------------
def test_prompts_section_loads_checks_and_explains(tmp_path):
    cfg = load_config(None, ["prompts.path=p.txt", "prompts.heldout_fraction=0.25", "prompts.max_sequence_length=226"])
    assert isinstance(cfg.prompts, PromptsConfig) and cfg.prompts.path == "p.txt"
    assert (cfg.prompts.heldout_fraction, cfg.prompts.max_sequence_length, cfg.prompts.negative_prompt) == (0.25, 226, "")
    with pytest.raises(ConfigError) as info:
        load_config(None, ["prompts.heldout_fraction=1.0", "prompts.batch_size=0", "prompts.max_sequence_length=0",
                           "prompts.dtype=int8"])
    text = str(info.value)
    for key in ("prompts.heldout_fraction", "prompts.batch_size", "prompts.max_sequence_length", "prompts.dtype"):
        assert key in text, text
    assert "prompts.negative_prompt" in explain("prompts") and "prompts.cache" in explain("prompts")

    with pytest.raises(ConfigError, match="'prompts.path' is not set"):
        load_prompts(RunConfig())
    (tmp_path / "p.txt").write_text("a cat\n")
    assert load_prompts(load_config(None, [f"prompts.path={tmp_path / 'p.txt'}"])).texts == ["a cat"]


# ----- the embedding cache ------------------------------------------------------------------------------
def test_cache_holds_what_the_encoder_computes(encoder, tmp_path):
    ps = _prompt_set(tmp_path)
    out = tmp_path / "emb"
    result = encode_prompts(_cfg(), ps, encoder, out)
    assert result["shards_total"] == 3 and result["shards_written"] == 3 and result["prompts_encoded"] == 5
    assert result["negatives_written"] and result["index"] == str(out / "index.json")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["settings.json", "index.json", "negatives.json", "negatives.safetensors"]
        + [f"shard_0000{k}.{ext}" for k in range(3) for ext in ("json", "safetensors")])
    assert json.loads((out / "shard_00001.json").read_text())["ids"] == ["q2", "q3"]

    emb_ref, mask_ref = encoder.encode(PROMPTS)
    reader = PromptEmbeddings(out)
    assert len(reader) == 5 and reader.ids == ps.ids and reader.shape == (LENGTH, 16) and reader.dtype == "float32"
    emb, mask = reader.get(ps.ids)
    assert emb.dtype == torch.float32 and mask.dtype == torch.bool and emb.shape == (5, LENGTH, 16)
    torch.testing.assert_close(emb, emb_ref)
    assert torch.equal(mask, mask_ref) and mask[0].tolist() == [True] * 6 + [False] * 2
    order = ["q4", "q0", "q3", "q0"]  # any order, across shards, repeats allowed
    emb2, mask2 = reader.get(order)
    torch.testing.assert_close(emb2, emb_ref[[4, 0, 3, 0]])
    assert torch.equal(mask2, mask_ref[[4, 0, 3, 0]])

    # Negative prompts: the default ("low quality") for q0 and q2, "blurry static frames" for q1 and q3,
    # q4's own "low quality" (the same text as the default, stored once).
    assert negative_texts(_cfg(), ps) == ["low quality", "blurry static frames"]
    assert reader.negative_texts == ["low quality", "blurry static frames"]
    neg_ref, neg_mask_ref = encoder.encode(["low quality", "blurry static frames"])
    neg, neg_mask = reader.negative(ps.ids)
    torch.testing.assert_close(neg, neg_ref[[0, 1, 0, 1, 0]])
    assert torch.equal(neg_mask, neg_mask_ref[[0, 1, 0, 1, 0]])
    assert reader.negative_text("q1") == "blurry static frames" and reader.negative_text("q2") == "low quality"
    with pytest.raises(KeyError, match="nope"):
        reader.get(["q0", "nope"])
    with pytest.raises(KeyError, match="nope"):
        reader.negative(["nope"])


def test_bfloat16_storage(encoder, tmp_path):
    ps = _prompt_set(tmp_path)
    encode_prompts(_cfg("prompts.dtype=bfloat16"), ps, encoder, tmp_path / "emb")
    emb, _ = PromptEmbeddings(tmp_path / "emb").get(["q1"])
    assert emb.dtype == torch.bfloat16
    torch.testing.assert_close(emb, encoder.encode([PROMPTS[1]])[0].bfloat16())


def _stat(path: Path):
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def test_a_killed_run_resumes_without_redoing_finished_shards(encoder, tmp_path):
    ps, out, cfg = _prompt_set(tmp_path), tmp_path / "emb", _cfg()
    # Rank 0 of 2 ran (jobs 0 and 2: shards 0 and 2); rank 1 (shard 1 and the negatives) was killed mid-write.
    counting = CountingEncoder(encoder)
    first = encode_prompts(cfg, ps, counting, out, rank=0, world_size=2)
    assert first["index"] is None and first["shards_written"] == 2 and not first["negatives_written"]
    assert counting.seen == [PROMPTS[0], PROMPTS[1], PROMPTS[4]]
    assert not (out / "index.json").exists()
    with pytest.raises(PromptError, match="not complete"):
        PromptEmbeddings(out)
    leftover = out / f"shard_00001.safetensors.tmp-{os.getpid() + 1}"
    leftover.write_bytes(b"half a shard")
    done = {name: _stat(out / name) for name in ("shard_00000.safetensors", "shard_00000.json",
                                                 "shard_00002.safetensors", "shard_00002.json")}

    counting.seen.clear()
    second = encode_prompts(cfg, ps, counting, out)  # the same command in one process finishes the rest
    assert second["jobs_done_before"] == 2 and second["shards_written"] == 1 and second["negatives_written"]
    assert counting.seen == [PROMPTS[2], PROMPTS[3], "low quality", "blurry static frames"]
    assert {name: _stat(out / name) for name in done} == done and not leftover.exists()
    torch.testing.assert_close(PromptEmbeddings(out).get(ps.ids)[0], encoder.encode(PROMPTS)[0])

    # A shard whose record never made it to disk is redone; nothing else is.
    (out / "shard_00001.json").unlink()
    (out / "index.json").unlink()
    counting.seen.clear()
    third = encode_prompts(cfg, ps, counting, out)
    assert third["shards_written"] == 1 and counting.seen == PROMPTS[2:4] and third["index"]
    counting.seen.clear()
    assert encode_prompts(cfg, ps, counting, out)["shards_written"] == 0 and counting.seen == []


def test_a_rerun_with_other_settings_is_refused(encoder, tmp_path):
    ps, out = _prompt_set(tmp_path), tmp_path / "emb"
    encode_prompts(_cfg(), ps, encoder, out)
    with pytest.raises(SettingsMismatch, match=r"other settings \(dtype differ\)"):
        encode_prompts(_cfg("prompts.dtype=bfloat16"), ps, encoder, out)
    with pytest.raises(SettingsMismatch, match=r"negative_prompt, shard_size differ"):
        encode_prompts(_cfg("prompts.negative_prompt=ugly", "prompts.shard_size=4"), ps, encoder, out)
    more = PromptSet([*ps, Prompt("q5", "a dog")])
    with pytest.raises(SettingsMismatch, match=r"num_prompts, prompts_sha1 differ"):
        encode_prompts(_cfg(), more, encoder, out)
    edited = PromptSet([Prompt(p.id, p.text, "other" if p.id == "q0" else p.negative_prompt) for p in ps])
    with pytest.raises(SettingsMismatch, match=r"\(prompts_sha1 differ\)"):
        encode_prompts(_cfg(), edited, encoder, out)
    with pytest.raises(ConfigError, match="max_sequence_length = 16, but the text encoder was built with max_length 8"):
        encode_prompts(_cfg("prompts.max_sequence_length=16"), ps, encoder, tmp_path / "other")
    assert encode_prompts(_cfg("prompts.max_sequence_length=8"), ps, encoder, out)["shards_written"] == 0


def test_a_shared_cache_is_reused_across_runs(encoder, tmp_path):
    ps = _prompt_set(tmp_path)
    cfg = _cfg(f"prompts.cache={tmp_path / 'shared'}")
    counting = CountingEncoder(encoder)
    reader = embed_prompts(cfg, ps, counting, tmp_path / "run1")
    assert reader.root.parent == tmp_path / "shared" and not (tmp_path / "run1").exists()
    seen = len(counting.seen)
    again = embed_prompts(cfg, ps, counting, tmp_path / "run2")
    assert again.root == reader.root and len(counting.seen) == seen  # nothing encoded twice
    other = embed_prompts(_cfg(f"prompts.cache={tmp_path / 'shared'}", "prompts.dtype=bfloat16"), ps, encoder,
                          tmp_path / "run3")
    assert other.root != reader.root and other.root.parent == reader.root.parent
    local = embed_prompts(_cfg(), ps, encoder, tmp_path / "run4")
    assert local.root == tmp_path / "run4" / "prompt_embeddings"
    torch.testing.assert_close(local.get(["q2"])[0], reader.get(["q2"])[0])
