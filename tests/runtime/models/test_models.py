"""Our Llama-family models over the paged KV cache vs. transformers' full forward on the same directory."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from radixlm.runtime.attention.torch_backend import TorchAttnBackend
from radixlm.runtime.forward_batch import ForwardBatch, ForwardMode
from radixlm.runtime.memory_pool import KVPool, ReqToTokenPool
from radixlm.runtime.models.loader import load_model
from radixlm.runtime.models.packed_linear import PackedLinear, can_pack, pack_linears

ARCHS = ("llama", "qwen2", "mistral")
ATOL = 1e-4
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def hf_model(path: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@torch.no_grad()
def hf_logits(ref, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] float32 logits of one sequence, no cache."""
    return ref(torch.tensor([ids])).logits[0].float()


class PagedRunner:
    """A minimal stand-in for the scheduler: allocates rows and KV slots and builds ForwardBatches."""

    def __init__(self, model, num_slots: int = 512, max_reqs: int = 8, max_len: int = 256):
        cfg = model.config
        param = next(model.parameters())
        self.model, self.device = model, param.device
        self.kv = KVPool(num_slots, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, param.dtype,
                         self.device)
        self.r2t = ReqToTokenPool(max_reqs, max_len, self.device)
        self.attn = TorchAttnBackend(self.kv, self.r2t)
        self.seqs: dict[int, list[int]] = {}  # row → all tokens whose KV is in the pool

    def new_request(self, prefix_of: int | None = None, prefix_len: int = 0) -> int:
        """A request row; optionally its first ``prefix_len`` positions reuse another row's KV slots."""
        row = self.r2t.alloc()
        self.seqs[row] = []
        if prefix_of is not None and prefix_len:
            self.r2t.write(row, 0, self.r2t.req_to_token[prefix_of, :prefix_len].clone())
            self.seqs[row] = self.seqs[prefix_of][:prefix_len]
        return row

    @torch.no_grad()
    def step(self, mode: ForwardMode, rows: list[int], new: list[list[int]], all_logits: bool) -> torch.Tensor:
        ids, pos, locs, prefix = [], [], [], []
        for row, toks in zip(rows, new):
            p = len(self.seqs[row])
            slots = self.kv.alloc(len(toks))
            self.r2t.write(row, p, slots)
            ids += toks
            pos += range(p, p + len(toks))
            locs.append(slots)
            prefix.append(p)
            self.seqs[row] = self.seqs[row] + toks
        fb = ForwardBatch.build(mode, ids, pos, torch.cat(locs), rows, prefix, [len(t) for t in new], self.device)
        if all_logits:
            fb.logits_indices = torch.arange(len(ids), device=self.device)
        self.attn.init_forward_metadata(fb)
        return self.model(fb, self.attn).cpu()


def random_prompts(vocab: int, lens: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in lens]


@pytest.mark.parametrize("packed", [False, True], ids=["F.linear", "packed"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_decode_and_prefix_reuse_match_transformers(make_model, arch, device, packed):
    path = make_model(arch)
    model, ref = load_model(path, torch.float32, device), hf_model(path)  # reference on CPU
    if packed:  # oneDNN prepacked weights (runtime/models/packed_linear.py): the CPU default
        if not can_pack(device, torch.float32):
            pytest.skip("packed linears are a CPU (oneDNN) path")
        assert pack_linears(model) == 4 * model.config.num_hidden_layers + (0 if model.lm_head is None else 1)
    atol = ATOL if device == "cpu" else 1e-3
    V = model.config.vocab_size
    run = PagedRunner(model)

    # 1. Batched prefill of four prompts of different lengths; logits for every position.
    prompts = random_prompts(V, (5, 11, 1, 17))
    rows = [run.new_request() for _ in prompts]
    logits = run.step(ForwardMode.EXTEND, rows, prompts, all_logits=True)
    assert logits.shape == (sum(map(len, prompts)), V) and logits.dtype == torch.float32
    expected = torch.cat([hf_logits(ref, p) for p in prompts])
    torch.testing.assert_close(logits, expected, atol=atol, rtol=0)

    # 2. A few batched greedy decode steps.
    last = expected[torch.cumsum(torch.tensor([len(p) for p in prompts]), 0) - 1]
    for _ in range(3):
        nxt = last.argmax(-1).tolist()
        last = run.step(ForwardMode.DECODE, rows, [[t] for t in nxt], all_logits=False)  # [B, V]
        expected = torch.stack([hf_logits(ref, run.seqs[r])[-1] for r in rows])
        torch.testing.assert_close(last, expected, atol=atol, rtol=0)

    # 3. Prefill that reuses cached prefixes (same KV slots via req_to_token) mixed with a cold request.
    warm1 = run.new_request(prefix_of=rows[3], prefix_len=12)
    warm2 = run.new_request(prefix_of=rows[1], prefix_len=len(run.seqs[rows[1]]))  # whole prompt + decoded
    cold = run.new_request()
    new = random_prompts(V, (6, 3, 4), seed=1)
    logits = run.step(ForwardMode.EXTEND, [warm1, warm2, cold], new, all_logits=True)
    expected = torch.cat([hf_logits(ref, run.seqs[r])[-len(t):] for r, t in zip([warm1, warm2, cold], new)])
    torch.testing.assert_close(logits, expected, atol=atol, rtol=0)


def test_default_logits_rows_are_last_token_of_each_request(tiny_llama):
    model = load_model(tiny_llama, torch.float32, "cpu")
    prompts = random_prompts(model.config.vocab_size, (4, 7, 2))
    run = PagedRunner(model)
    rows = [run.new_request() for _ in prompts]
    full = run.step(ForwardMode.EXTEND, rows, prompts, all_logits=True)
    run2 = PagedRunner(model)
    rows2 = [run2.new_request() for _ in prompts]
    last = run2.step(ForwardMode.EXTEND, rows2, prompts, all_logits=False)
    torch.testing.assert_close(last, full[torch.tensor([3, 10, 12])], atol=1e-5, rtol=0)


def test_the_runner_packs_linears_on_the_cpu_unless_disabled(tiny_llama):
    from radixlm.runtime.model_runner import ModelRunner
    from radixlm.runtime.server_args import ServerArgs

    def runner(**kw):
        return ModelRunner(ServerArgs.from_kwargs(model_path=tiny_llama, dtype="float32", device="cpu",
                                                  max_total_tokens=256, **kw))

    packed, plain = runner(), runner(disable_cpu_packed_linear=True)
    assert isinstance(packed.model.model.layers[0].mlp.down_proj, PackedLinear)
    assert isinstance(packed.model.lm_head, PackedLinear)
    assert type(plain.model.model.layers[0].mlp.down_proj) is torch.nn.Linear


def test_tied_and_untied_embeddings(make_model):
    qwen = load_model(make_model("qwen2"), torch.float32, "cpu")
    llama = load_model(make_model("llama"), torch.float32, "cpu")
    assert qwen.lm_head_weight.data_ptr() == qwen.model.embed_tokens.weight.data_ptr()
    assert llama.lm_head_weight.data_ptr() != llama.model.embed_tokens.weight.data_ptr()
    assert qwen.model.layers[0].self_attn.qkv_proj.bias is not None  # Qwen2: q/k/v bias
    assert llama.model.layers[0].self_attn.qkv_proj.bias is None


def test_sharded_checkpoint_loads_identically(make_model, tmp_path):
    path = make_model("mistral")
    ref = hf_model(path)
    ref.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    a, b = load_model(path, torch.float32, "cpu"), load_model(str(tmp_path), torch.float32, "cpu")
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na
    prompt = random_prompts(a.config.vocab_size, (9,))
    run = PagedRunner(b)
    logits = run.step(ForwardMode.EXTEND, [run.new_request()], prompt, all_logits=True)
    torch.testing.assert_close(logits, hf_logits(ref, prompt[0]), atol=ATOL, rtol=0)


def _with_rope(src: str, dst, rope: dict, legacy: bool = False) -> str:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    theta = cfg["rope_parameters"]["rope_theta"]
    if legacy:  # transformers-4 layout: rope_theta + rope_scaling {"type": ...}
        del cfg["rope_parameters"]
        cfg["rope_theta"], cfg["rope_scaling"] = theta, rope
    else:
        cfg["rope_parameters"] = {"rope_theta": theta, **rope}
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


ROPE_CASES = {
    "linear": ({"rope_type": "linear", "factor": 4.0}, False),
    "linear-legacy": ({"type": "linear", "factor": 2.0}, True),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}, False),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}, False),
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_rope_scaling_matches_transformers(make_model, tmp_path, case):
    rope, legacy = ROPE_CASES[case]
    path = _with_rope(make_model("llama"), tmp_path / case, rope, legacy)
    model, ref = load_model(path, torch.float32, "cpu"), hf_model(path)
    prompts = random_prompts(model.config.vocab_size, (40, 7))
    run = PagedRunner(model)
    logits = run.step(ForwardMode.EXTEND, [run.new_request(), run.new_request()], prompts, all_logits=True)
    expected = torch.cat([hf_logits(ref, p) for p in prompts])
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)
    # The scaling really changed something: the unscaled model disagrees.
    base = PagedRunner(load_model(make_model("llama"), torch.float32, "cpu"))
    plain = base.step(ForwardMode.EXTEND, [base.new_request()], prompts[:1], all_logits=True)
    assert (plain - expected[:40]).abs().max() > 1e-2


def test_dynamic_rope_uses_fixed_extended_base(make_model, tmp_path):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from radixlm.runtime.models.rope import rope_inv_freq

    path = _with_rope(make_model("llama"), tmp_path / "dyn", {"rope_type": "dynamic", "factor": 2.0})
    cfg = AutoConfig.from_pretrained(path)
    ours, scale = rope_inv_freq(cfg)
    theirs, _ = ROPE_INIT_FUNCTIONS["dynamic"](cfg, torch.device("cpu"), seq_len=2 * cfg.max_position_embeddings)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    default, _ = rope_inv_freq(AutoConfig.from_pretrained(make_model("llama")))
    assert scale == 1.0 and not torch.equal(ours, default)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_transformers(make_model, dtype):
    path = make_model("qwen2")
    model, ref = load_model(path, dtype, "cpu"), hf_model(path, dtype)
    assert all(p.dtype == dtype for p in model.parameters())
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    prompts = random_prompts(model.config.vocab_size, (12, 5))
    run = PagedRunner(model)
    logits = run.step(ForwardMode.EXTEND, [run.new_request(), run.new_request()], prompts, all_logits=True)
    expected = torch.cat([hf_logits(ref, p) for p in prompts])
    assert logits.dtype == torch.float32
    # Half precision: both round differently (attention kernels), but stay close on ~20-magnitude logits.
    assert (logits - expected).abs().max() < 0.5
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.8


def test_auto_dtype_reads_config(tiny_llama):
    model = load_model(tiny_llama, "auto", "cpu")
    assert next(model.parameters()).dtype == torch.float32
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_bad_checkpoints_raise_value_error(make_model, tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "broken"
    shutil.copytree(make_model("llama"), path)
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.weight"]
    save_file(weights, path / "model.safetensors")
    with pytest.raises(ValueError, match="k_proj|qkv_proj"):
        load_model(str(path), torch.float32, "cpu")

    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="architectures"):
        load_model(str(path), torch.float32, "cpu")
    with pytest.raises(ValueError, match="dtype"):
        load_model(make_model("llama"), "int8", "cpu")
