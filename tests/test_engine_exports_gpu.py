"""On real GPUs with vLLM installed: the exported `vllm serve` command starts a server that answers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

import nbgpu

pytestmark = pytest.mark.gpu


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _save_word_tokenizer(transformers, path, vocab_size: int) -> None:
    """A tokenizer made here (no hub): one word per id, "t0" .. "t{vocab_size - 1}"."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1",
                                         eos_token="t2").save_pretrained(path)


def test_vllm_serves_the_exported_pipeline_split(tmp_path):
    pytest.importorskip("vllm")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(tmp_path)
    _save_word_tokenizer(transformers, tmp_path, cfg.vocab_size)
    plan = nbgpu.plan(str(tmp_path), gpus=2, batch=2, seq_len=512, strategy=[2, 4])
    v = plan.vllm()
    assert v["env"]["VLLM_PP_LAYER_PARTITION"] == "2,4"
    port = _free_port()
    # the exported command, plus what a shared test machine needs
    command = f"{v['command']} --enforce-eager --gpu-memory-utilization 0.3 --port {port}"
    proc = subprocess.Popen(command, shell=True, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(2)
        else:
            pytest.fail("vllm serve did not come up in 10 minutes")
        body = json.dumps({"model": str(tmp_path), "prompt": "t5 t6 t7 t8", "max_tokens": 4,
                           "ignore_eos": True}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        answer = json.load(urllib.request.urlopen(req, timeout=60))
        assert answer["usage"]["completion_tokens"] == 4
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
