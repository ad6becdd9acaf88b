"""A tiny random LLaVA saved as a local directory, and ``transformers serve`` running it on 127.0.0.1 (for the
VLM labeller against a real server: tests/test_vlm_serve.py, benchmarks/bench_label.py).

The model is LLaVA-style (``LlavaForConditionalGeneration``: a one-layer CLIP vision tower on 16 x 16 images in
8 x 8 patches, a one-layer Llama, about 18k parameters) with a byte-level BPE tokenizer trained here by
``tokenizers`` (no download), a chat template that puts ``<image>`` where an image part is, and a
``LlavaProcessor`` with ``CLIPImageProcessor`` (its PIL backend: torchvision is not needed). Each image becomes
``IMAGE_TOKENS`` = 4 patches + CLS = 5 tokens. Its answers are random text; greedy decoding makes them repeatable.

``TransformersServer`` starts ``transformers serve MODEL_DIR`` (the OpenAI-compatible server that ships with
transformers, ``pip install "transformers[serving]"``) in a subprocess on a free port of 127.0.0.1 with the hub
offline, waits for ``/health``, and kills it on ``close``. ``serve_unavailable()`` says why it cannot run here
(None when it can).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

IMAGE_SIZE, PATCH = 16, 8
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2 + 1
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}<image>{% endif %}{% endfor %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}")
_CORPUS = ["Video A is better. Video B is better. TIE. A B TIE", "Answer with exactly one of: A, B, TIE.",
           "Two AI-generated videos were made from the same text prompt", "user assistant segment seconds frames"]


def serve_unavailable() -> Optional[str]:
    """Why ``transformers serve`` cannot run here, or None."""
    try:
        from transformers.utils.import_utils import is_serve_available
    except ImportError as err:
        return f"transformers is not importable: {err}"
    if not is_serve_available():
        return 'transformers serve needs its extra: pip install "transformers[serving]"'
    try:
        import transformers.cli.transformers  # noqa: F401  (the `transformers` command)
    except ImportError as err:
        return f"the transformers command is not importable: {err}"
    return None


def build_tiny_llava(out: Path, seed: int = 0) -> Path:
    """Save the tiny LLaVA (model, tokenizer, chat template, processor) in ``out``; returns ``out``."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # CLIPImageProcessor warns that it falls back to PIL without torchvision
    try:
        return _build(out, seed)
    finally:
        hf_logging.set_verbosity(verbosity)


def _build(out: Path, seed: int) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    special = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(_CORPUS * 20, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    images = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=PATCH,
                               vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE,
                               num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH,
                                       projection_dim=16),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="full",
        vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.max_new_tokens = 8
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def token_id(model_dir: Path, token: str) -> int:
    """The id of ``token`` in the tiny model's vocabulary (read from tokenizer.json, no transformers import)."""
    vocab = json.loads((Path(model_dir) / "tokenizer.json").read_text())["model"]["vocab"]
    return vocab[token]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TransformersServer:
    """``transformers serve MODEL_DIR`` on a free port of 127.0.0.1 (pinned to that model), offline."""

    def __init__(self, model_dir: Path, log_path: Path, *, ready_timeout_s: float = 180.0) -> None:
        self.model = str(model_dir)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "NO_PROXY": "127.0.0.1,localhost", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        command = [sys.executable, "-c", "import sys; from transformers.cli.transformers import main; "
                   "sys.argv[0] = 'transformers'; sys.exit(main())",
                   "serve", self.model, "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu",
                   "--log-level", "warning"]
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        try:
            self._wait_ready(ready_timeout_s)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with opener.open(f"http://127.0.0.1:{self.port}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"transformers serve not ready after {timeout_s:g} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)   # its own session: the server and anything it started
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self._log.close()
