"""The torch attention backend: the CPU default and the reference for every other backend.

Batched over requests with padding, in groups chosen so that the padding stays small and the cheapest
SDPA path applies:
  * decodes (one new token): on the CPU, one group for all of them, read in place by the native paged
    decode kernel (cpu_paged_decode.py: no gather, no padding, ragged lengths; behind a shared prefix
    that many requests would each read, the kernel reads each request's suffix and the cascade below
    the prefix). Without it (another device, no compiler, ``paged_decode=False``) they are bucketed by
    context length, so a batch with contexts of 64 to 576 tokens does not pad every request to 576 (a
    bucket's shortest context is at least ``bucket_ratio`` of its longest);
  * causal extends (several new tokens after at most ``causal_max_prefix`` cached ones: fresh prompts,
    and the prompts whose only cache hit is their BOS token): SDPA's causal path, no mask. A request
    with P cached tokens is laid out as a causal sequence of P + n rows whose first P query rows are
    padding, so its new token i sits at row P + i and sees keys j <= P + i, exactly the cached prefix
    and itself. Right padding never leaks into a valid row. A request with at least
    ``ragged_min_tokens`` new tokens attends on its own (one SDPA call per request and layer, on the
    step's own K/V rows: nothing gathered from the pool but the P cached ones, nothing padded to a
    longer neighbour; a 2k-token prefill's attention measured 15 against 19 ms per layer bucketed);
    shorter ones are bucketed like decodes, where one call for many requests is cheaper;
  * masked extends (chunks and cache hits with a longer prefix, jump-forward runs): one boolean mask
    ``[B, 1, Qmax, Lmax]``, or the cascade path below.
On the CPU with AVX-512 and a head size of 64 or 128, every extend instead goes through the native
paged extend kernel (cpu_paged_extend.py) in one call per layer, reading each request's K/V in place
(behind a shared prefix only each suffix, with its log-sum-exp, and the cascade below the prefix).
Per group and step it builds one gather index ``[B, Lmax]`` into the KV pool (and a mask where needed);
every layer then does one gather per K and V, into reused workspace buffers (a fresh multi-megabyte
tensor per layer costs more in page faults than the copy itself), and one SDPA call per group. No
Python loop over requests runs per layer.

Cascade attention for shared prefixes: when the requests of a group share their first P KV slots (the
radix cache hands every request with a common prompt prefix the same slots), the shared keys are read
once and attended by all the group's queries at once, unpadded (the prefix precedes every query, so no
mask); only each request's own suffix is read per request (by a paged kernel in place, or gathered,
padded and masked); the two partial softmaxes are merged with their log-sum-exps. The shared part runs
torch's fused CPU flash kernel, which returns the log-sum-exp and never materialises the [queries, keys]
scores (the explicit softmax it replaced wrote and re-read 256 MB per layer on few-shot extends and
made them 3x slower). A 1k-token few-shot prefix decoded by 200 requests is read once per layer, not 200.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from radixlm.runtime.attention.base import AttentionBackend
from radixlm.runtime.forward_batch import ForwardBatch
from radixlm.runtime.memory_pool import KVPool, ReqToTokenPool


@dataclass(frozen=True)
class TorchAttnConfig:
    """How the torch backend groups a step's requests (every choice gives the same result)."""

    cascade_min_shared: int = 32  # shared KV slots below which the plain padded path is as cheap
    # Paged decodes cascade only when that spares the kernel at least this many key reads per layer,
    # (requests - 1) x shared slots: the cascade's gather, flash call and merge cost about as much as
    # the kernel reading ~25k keys itself (interpolated between the two workloads below). Measured on the llama ``small`` shapes, 2 threads: chat
    # (16 requests behind 256 slots: 3.8k) and fork tree (32 behind 512: 16k) decode attention took
    # 1.3-1.4 s / 0.34 s with the cascade and 0.73-0.79 s / 0.25-0.27 s without; few-shot (200 behind
    # 1,000: 199k) needs it (docs/benchmarks.md, the levers table).
    paged_cascade_min_saved_keys: int = 32768
    causal_max_prefix: int = 16  # cached tokens up to which an extend takes the causal path
    ragged_min_tokens: int = 32  # new tokens from which a causal extend attends on its own, unpadded
    bucket_ratio: float = 0.75  # in a bucket, shortest context >= this x longest (1.0: equal lengths only)
    # On the CPU, decodes read the pool in place through the native paged decode kernel
    # (cpu_paged_decode.py), all in one group, instead of gathering each bucket's padded context per
    # layer. False (or no compiler to build it): the gather path.
    paged_decode: bool = True
    # On the CPU, extends go through the native paged extend kernel (cpu_paged_extend.py), all in one
    # call (behind a shared prefix, their suffixes). False (no AVX-512, no compiler, shapes it does not
    # cover, or the backend not told the query heads): the paths above.
    paged_extend: bool = True


@dataclass(frozen=True)
class _PagedExtends:
    """Extends attended by the native kernel in one call, reading the pool in place; [B] int64 each."""

    rows: torch.Tensor  # each request's req_to_token row
    q_start: torch.Tensor  # its first token in the step's [T] order
    prefix: torch.Tensor  # cached slots before its new tokens
    n_new: torch.Tensor


@dataclass
class _Group:
    tokens: torch.Tensor  # [Tg] indices of this group's tokens in the step's [T] token order
    kv_idx: torch.Tensor | None  # [Bg, Lmax] int64 KV slots (0 = padding); None for the paged decode group
    mask: torch.Tensor | None  # [Bg, 1, Qmax, Lmax] bool, True = may attend (None: see `causal`)
    causal: bool  # no mask: plain causal attention (causal extends), or all keys valid (equal decodes)
    shared: torch.Tensor | None  # [P] KV slots every request of the group starts with (cascade), or None
    q_flat: torch.Tensor | None  # [Tg] row of each token in the padded [Bg * Qmax] query layout
    batch: int
    qmax: int
    # The paged decode group (kernel reads the pool in place; with ``shared`` only each request's suffix
    # after it): each request's req_to_token row and context length, [Bg] int64 each.
    rows: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    # A cascade of extends: the extend kernel's arguments for their suffixes (q_start within the group).
    suffix: _PagedExtends | None = None
    _bias: dict = field(default_factory=dict)  # (G, dtype) → folded_bias, built at the step's first layer

    def folded_bias(self, G: int, dtype: torch.dtype) -> torch.Tensor:
        """``mask`` [Bg, 1, Qmax, L] with each query row repeated for the G query heads of a KV head (the
        row layout of the GQA-folded queries in the cascade and in decodes), as 0 / -inf in ``dtype``:
        [Bg, 1, Qmax * G, L]. Built once per step."""
        key = (G, dtype)
        if key not in self._bias:
            m = self.mask.repeat_interleave(G, dim=2)
            self._bias[key] = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, float("-inf"))
        return self._bias[key]


@dataclass(frozen=True)
class _Ragged:
    """Causal extends attended one request at a time on the step's own K/V rows (no padding)."""

    spans: list[tuple[int, int]]  # (first row in the step's [T] tokens, new tokens) per request
    prefixes: list[torch.Tensor | None]  # the P <= causal_max_prefix cached KV slots of each, or None


@dataclass
class TorchAttnMetadata:
    groups: list[_Group]
    ragged: _Ragged | None = None
    paged_extends: _PagedExtends | None = None


class TorchAttnBackend(AttentionBackend):
    def __init__(self, kv_pool: KVPool, req_to_token_pool: ReqToTokenPool, config: TorchAttnConfig = TorchAttnConfig(),
                 num_heads: int | None = None):
        """``num_heads``: query heads per layer; the extend kernel is used only when it is given and covered."""
        self.kv_pool = kv_pool
        self.req_to_token = req_to_token_pool.req_to_token
        self.config = config
        # Gather targets reused across layers and steps: [n, Hkv, D] each, grown on demand.
        self._k_ws = self._v_ws = None
        self._paged = self._extend = None
        on_cpu = torch.device(kv_pool.device).type == "cpu"
        if config.paged_decode and on_cpu:
            from radixlm.runtime.attention import cpu_paged_decode

            kernel = cpu_paged_decode.load()
            self._paged = kernel if kernel is not None and kernel.supports(kv_pool.dtype) else None
        if config.paged_extend and on_cpu and num_heads is not None:
            from radixlm.runtime.attention import cpu_paged_extend

            kernel = cpu_paged_extend.load()
            hkv, d = kv_pool.k_buffers[0].shape[1:]
            self._extend = kernel if kernel is not None and kernel.supports(kv_pool.dtype, num_heads, hkv, d) else None

    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        device = fb.input_ids.device
        ext, pre, seq = fb.extend_lens_cpu, fb.prefix_lens_cpu, fb.seq_lens_cpu
        starts = [0]
        for n in ext[:-1]:
            starts.append(starts[-1] + n)
        cfg = self.config
        decodes = [b for b, n in enumerate(ext) if n == 1]
        causal = [b for b, n in enumerate(ext) if n > 1 and pre[b] <= cfg.causal_max_prefix]
        masked = [b for b, n in enumerate(ext) if n > 1 and pre[b] > cfg.causal_max_prefix]
        groups = []
        if decodes:
            min_shared = cfg.cascade_min_shared
            if self._paged is not None and len(decodes) > 1:  # the prefix must spare enough kernel reads
                min_shared = max(min_shared, -(-cfg.paged_cascade_min_saved_keys // (len(decodes) - 1)))
            shared = self._shared_prefix(fb, decodes, [seq[b] for b in decodes], min_shared)
            if self._paged is not None:  # one group whatever the lengths: the kernel needs no padding
                idx = torch.tensor(decodes, dtype=torch.int64, device=device)
                groups.append(_Group(torch.tensor([starts[b] for b in decodes], dtype=torch.int64, device=device),
                                     None, None, False, shared, torch.arange(len(decodes), device=device),
                                     len(decodes), 1, rows=fb.req_pool_indices[idx], seq_lens=fb.seq_lens[idx]))
            elif shared is not None:
                groups.append(self._group(fb, decodes, starts, device, shared=shared))
            else:
                groups += [self._group(fb, m, starts, device) for m in _buckets(decodes, seq, cfg.bucket_ratio)]
        shared = None
        if masked:
            shared = self._shared_prefix(fb, masked, [pre[b] for b in masked], cfg.cascade_min_shared)
        kernel_extends: list[int] = []
        if self._extend is not None:  # every extend; behind a shared prefix the cascade's suffixes (below)
            kernel_extends, causal = causal, []
            if shared is None:
                kernel_extends, masked = sorted(kernel_extends + masked), []
        alone = [b for b in causal if ext[b] >= cfg.ragged_min_tokens]
        causal = [b for b in causal if ext[b] < cfg.ragged_min_tokens]
        groups += [self._group(fb, m, starts, device, causal=True) for m in _buckets(causal, seq, cfg.bucket_ratio)]
        if masked and shared is not None and self._extend is not None:
            groups.append(self._suffix_cascade(fb, masked, starts, device, shared))
        elif masked:
            groups.append(self._group(fb, masked, starts, device, shared=shared))
        ragged = paged_extends = None
        if alone:
            prefixes = [self.req_to_token[fb.req_pool_indices[b], :pre[b]] if pre[b] else None for b in alone]
            ragged = _Ragged([(starts[b], ext[b]) for b in alone], prefixes)
        if kernel_extends:
            paged_extends = self._paged_extends(fb, kernel_extends, [starts[b] for b in kernel_extends], device)
        fb.attn_metadata = TorchAttnMetadata(groups, ragged, paged_extends)

    def _shared_prefix(self, fb: ForwardBatch, members: list[int], visible: list[int],
                       min_shared: int) -> torch.Tensor | None:
        """The longest run of KV slots all ``members`` start with, within ``visible`` of each, if at least
        ``min_shared`` long."""
        cap = min(visible)
        if len(members) < 2 or cap < min_shared:
            return None
        rows = self.req_to_token[fb.req_pool_indices[torch.tensor(members, device=fb.input_ids.device)], :cap]
        p = int((rows == rows[:1]).all(dim=0).long().cumprod(0).sum())
        return rows[0, :p] if p >= min_shared else None

    def _suffix_cascade(self, fb: ForwardBatch, members: list[int], starts: list[int], device,
                        shared: torch.Tensor) -> _Group:
        """A cascade over ``shared`` whose per-request suffixes the extend kernel reads in place."""
        ext = [fb.extend_lens_cpu[b] for b in members]
        q_start = [0, *itertools.accumulate(ext[:-1])]  # within the group's own tokens
        return _Group(_token_indices(members, starts, ext, device), None, None, False, shared, None, len(members),
                      max(ext), suffix=self._paged_extends(fb, members, q_start, device))

    @staticmethod
    def _paged_extends(fb: ForwardBatch, members: list[int], q_start: list[int], device) -> _PagedExtends:
        """The extend kernel's per-request arguments for ``members``, whose first queries are at ``q_start``."""
        idx = torch.tensor(members, dtype=torch.int64, device=device)
        return _PagedExtends(fb.req_pool_indices[idx].contiguous(), torch.tensor(q_start, dtype=torch.int64),
                             fb.prefix_lens[idx].contiguous(), fb.extend_lens[idx].contiguous())

    def _group(self, fb: ForwardBatch, members: list[int], starts: list[int], device, causal: bool = False,
               shared: torch.Tensor | None = None) -> _Group:
        ext = [fb.extend_lens_cpu[b] for b in members]
        pre = [fb.prefix_lens_cpu[b] for b in members]
        seq = [fb.seq_lens_cpu[b] for b in members]
        lmax, B = max(seq), len(members)
        idx = torch.tensor(members, dtype=torch.int64, device=device)
        seq_lens, prefix_lens, extend_lens = fb.seq_lens[idx], fb.prefix_lens[idx], fb.extend_lens[idx]
        j = torch.arange(lmax, device=device)  # [Lmax]
        kv_idx = self.req_to_token[fb.req_pool_indices[idx], :lmax]  # [B, Lmax]
        kv_idx = torch.where(j[None, :] < seq_lens[:, None], kv_idx, torch.zeros_like(kv_idx))
        tokens = _token_indices(members, starts, ext, device)
        q_b = torch.repeat_interleave(torch.arange(B, device=device), extend_lens)  # [Tg]
        q_i = torch.arange(len(tokens), device=device) - (torch.cumsum(extend_lens, 0) - extend_lens)[q_b]  # [Tg]
        if causal:  # rows: the whole sequence; new token i of request b at row prefix_len[b] + i
            return _Group(tokens, kv_idx, None, True, None, q_b * lmax + prefix_lens[q_b] + q_i, B, lmax)
        qmax = max(ext)
        q_flat = q_b * qmax + q_i
        if shared is None and qmax == 1 and all(x == lmax for x in seq):
            return _Group(tokens, kv_idx, None, False, None, q_flat, B, qmax)
        i = torch.arange(qmax, device=device)  # [Qmax]
        # Query i of request b sits at absolute position prefix_len[b] + i and sees keys j <= that.
        limit = prefix_lens[:, None] + i[None, :]  # [B, Qmax]
        mask = j[None, None, :] <= limit[:, :, None]  # [B, Qmax, Lmax]
        valid_q = i[None, :] < extend_lens[:, None]  # [B, Qmax]
        if shared is not None:  # keep only the per-request suffix; padded query rows see nothing there
            p = shared.numel()
            return _Group(tokens, kv_idx[:, p:], (mask & valid_q[:, :, None])[:, None, :, p:], False, shared,
                          q_flat, B, qmax)
        # Padded query rows attend to key 0 only, so softmax never sees an all-masked row.
        mask = torch.where(valid_q[:, :, None], mask, j[None, None, :] == 0)
        return _Group(tokens, kv_idx, mask[:, None], False, None, q_flat, B, qmax)

    def forward(self, q, k, v, layer_id, fb, sm_scale):
        self.kv_pool.set_kv(layer_id, fb.out_cache_loc, k, v)
        md: TorchAttnMetadata = fb.attn_metadata
        T, Hq, D = q.shape
        if md.ragged is None and md.paged_extends is None and len(md.groups) == 1 and md.groups[0].tokens.numel() == T:
            return self._attend(q, md.groups[0], layer_id, sm_scale)
        o = q.new_empty((T, Hq, D))
        for g in md.groups:
            o.index_copy_(0, g.tokens, self._attend(q.index_select(0, g.tokens), g, layer_id, sm_scale))
        if md.ragged is not None:
            self._attend_ragged(q, k, v, md.ragged, layer_id, sm_scale, o)
        if md.paged_extends is not None:
            e = md.paged_extends
            self._extend(q, self.kv_pool.k_buffers[layer_id], self.kv_pool.v_buffers[layer_id], self.req_to_token,
                         e.rows, e.q_start, e.prefix, e.n_new, sm_scale, o)
        return o

    def _attend_ragged(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r: _Ragged, layer_id: int,
                       sm_scale: float, o: torch.Tensor) -> None:
        """Causal attention of each request in ``r`` on its own rows of q [T, Hq, D], k/v [T, Hkv, D],
        written into o [T, Hq, D]. A request with P cached slots gets them from the pool and P zero query
        rows in front, so SDPA's top-left causal alignment puts new token i at row P + i."""
        k_buf, v_buf = self.kv_pool.k_buffers[layer_id], self.kv_pool.v_buffers[layer_id]
        gqa = k.shape[1] != q.shape[1]
        for (s, n), pre in zip(r.spans, r.prefixes):
            # The keys as the pool holds them (a no-op when the pool has the model's dtype).
            qq = q[s:s + n]
            kk, vv = k[s:s + n].to(k_buf.dtype).to(q.dtype), v[s:s + n].to(v_buf.dtype).to(q.dtype)
            if pre is not None:
                p = pre.numel()
                qq = torch.cat([qq.new_zeros((p, *qq.shape[1:])), qq])
                kk = torch.cat([k_buf.index_select(0, pre).to(q.dtype), kk])
                vv = torch.cat([v_buf.index_select(0, pre).to(q.dtype), vv])
            out = F.scaled_dot_product_attention(qq.transpose(0, 1)[None], kk.transpose(0, 1)[None],
                                                 vv.transpose(0, 1)[None], is_causal=True, scale=sm_scale,
                                                 enable_gqa=gqa)  # [1, Hq, P + n, D]
            o[s:s + n] = out[0, :, out.shape[2] - n:].transpose(0, 1)

    def _gather(self, layer_id: int, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the KV slots ``flat`` [n] → two [n, Hkv, D] views of the workspace buffers.

        The views are overwritten by the next gather: use them before gathering again.
        """
        k_buf, v_buf = self.kv_pool.k_buffers[layer_id], self.kv_pool.v_buffers[layer_id]
        n = flat.numel()
        if self._k_ws is None or self._k_ws.shape[0] < n or self._k_ws.dtype != k_buf.dtype:
            self._k_ws = k_buf.new_empty((n, *k_buf.shape[1:]))
            self._v_ws = v_buf.new_empty((n, *v_buf.shape[1:]))
        # index_select on the flattened index is several times faster than advanced indexing on CPU.
        ks = torch.index_select(k_buf, 0, flat, out=self._k_ws[:n])
        vs = torch.index_select(v_buf, 0, flat, out=self._v_ws[:n])
        return ks, vs

    def _attend(self, q: torch.Tensor, g: _Group, layer_id: int, sm_scale: float) -> torch.Tensor:
        """q [Tg, Hq, D] of one group → o [Tg, Hq, D]."""
        Hq, D = q.shape[1], q.shape[2]
        if g.shared is not None:
            return self._cascade(q, g, layer_id, sm_scale)
        if g.rows is not None:  # paged decode: keys and values read from the pool in place
            return self._paged(q, self.kv_pool.k_buffers[layer_id], self.kv_pool.v_buffers[layer_id],
                               self.req_to_token, g.rows, g.seq_lens, sm_scale)
        k_all, v_all = self._gather(layer_id, g.kv_idx.reshape(-1))
        k_all = k_all.view(g.batch, -1, *k_all.shape[1:])  # [B, Lmax, Hkv, D]
        v_all = v_all.view(g.batch, -1, *v_all.shape[1:])
        Hkv = k_all.shape[2]
        if g.qmax == 1 and Hkv != Hq and q.device.type == "cpu":
            # GQA decode: the G query heads of a KV head become G query rows of one attention, so the
            # gathered K/V are read as they are (SDPA's enable_gqa would copy them G times first).
            G = Hq // Hkv
            bias = None if g.mask is None else g.folded_bias(G, q.dtype)
            o, _ = _attention_with_lse(q.view(g.batch, Hkv, G, D), k_all.transpose(1, 2).to(q.dtype),
                                       v_all.transpose(1, 2).to(q.dtype), bias, sm_scale)  # [B, Hkv, G, D]
            return o.reshape(g.batch, Hq, D)
        q_pad = self._pad(q, g)
        o = F.scaled_dot_product_attention(
            q_pad.transpose(1, 2),  # [B, Hq, Qmax, D]
            k_all.transpose(1, 2).to(q.dtype),  # [B, Hkv, Lmax, D]
            v_all.transpose(1, 2).to(q.dtype),
            attn_mask=g.mask,
            is_causal=g.causal,
            scale=sm_scale,
            enable_gqa=k_all.shape[2] != Hq,
        )  # [B, Hq, Qmax, D]
        o = o.transpose(1, 2)  # [B, Qmax, Hq, D]
        return o[:, 0] if g.qmax == 1 else o.reshape(-1, Hq, D).index_select(0, g.q_flat)

    @staticmethod
    def _pad(q: torch.Tensor, g: _Group) -> torch.Tensor:
        """q [Tg, Hq, D] → [B, Qmax, Hq, D] (zeros in padded rows)."""
        if g.qmax == 1:
            return q[:, None]  # decodes: one token per request, already in request order
        Hq, D = q.shape[1], q.shape[2]
        return q.new_zeros((g.batch * g.qmax, Hq, D)).index_copy_(0, g.q_flat, q).view(g.batch, g.qmax, Hq, D)

    def _cascade(self, q: torch.Tensor, g: _Group, layer_id: int, scale: float) -> torch.Tensor:
        """Attention over (shared prefix ++ own suffix) for q [Tg, Hq, D] (token order) → [Tg, Hq, D]."""
        T, Hq, D = q.shape
        k_buf, v_buf = self.kv_pool.k_buffers[layer_id], self.kv_pool.v_buffers[layer_id]
        Hkv = k_buf.shape[1]
        G = Hq // Hkv  # query heads per KV head: query head h reads KV head h // G
        # Shared prefix: no mask (it precedes every query), so the queries need no padding; the G query
        # heads of a KV head are folded into the rows of one attention over the P shared keys.
        ks = k_buf.index_select(0, g.shared).to(q.dtype).transpose(0, 1)[None]  # [1, Hkv, P, D]
        vs = v_buf.index_select(0, g.shared).to(q.dtype).transpose(0, 1)[None]
        qs = q.view(T, Hkv, G, D).permute(1, 0, 2, 3).reshape(1, Hkv, T * G, D)
        o_s, lse_s = _attention_with_lse(qs, ks, vs, None, scale)  # [1, Hkv, T*G, D], [1, Hkv, T*G]
        o_s = o_s.view(Hkv, T, G, D).transpose(0, 1).reshape(T, Hq, D)
        lse_s = lse_s.view(Hkv, T, G).transpose(0, 1).reshape(T, Hq)
        if g.rows is not None:  # paged decodes: each request's suffix read from the pool in place
            o_u, lse_u = self._paged(q, k_buf, v_buf, self.req_to_token, g.rows, g.seq_lens, scale,
                                     begin=g.shared.numel(), return_lse=True)  # [Tg, Hq, D], [Tg, Hq]
            return _merge(o_s, lse_s, o_u, lse_u)
        if g.suffix is not None:  # extends: the kernel reads each suffix in place, causal within the step
            e = g.suffix
            o_u, lse_u = torch.empty_like(q), q.new_empty((T, Hq), dtype=torch.float32)
            self._extend(q, k_buf, v_buf, self.req_to_token, e.rows, e.q_start, e.prefix, e.n_new, scale, o_u,
                         begin=g.shared.numel(), lse=lse_u)  # [Tg, Hq, D], [Tg, Hq]
            return _merge(o_s, lse_s, o_u, lse_u)
        # Own suffix: gathered per request, queries padded to [B, Qmax], masked (causal within the step).
        B, Q, lu = g.batch, g.qmax, g.kv_idx.shape[1]
        ku, vu = self._gather(layer_id, g.kv_idx.reshape(-1))
        ku = ku.view(B, lu, Hkv, D).to(q.dtype).transpose(1, 2)  # [B, Hkv, Lu, D]
        vu = vu.view(B, lu, Hkv, D).to(q.dtype).transpose(1, 2)
        qu = self._pad(q, g).view(B, Q, Hkv, G, D).permute(0, 2, 1, 3, 4).reshape(B, Hkv, Q * G, D)
        o_u, lse_u = _attention_with_lse(qu, ku, vu, g.folded_bias(G, q.dtype), scale)
        # Back to token order: padded rows (no suffix key; their lse is meaningless) are dropped here.
        o_u = o_u.view(B, Hkv, Q, G, D).permute(0, 2, 1, 3, 4).reshape(B * Q, Hq, D)
        lse_u = lse_u.view(B, Hkv, Q, G).permute(0, 2, 1, 3).reshape(B * Q, Hq)
        if Q > 1:
            o_u, lse_u = o_u.index_select(0, g.q_flat), lse_u.index_select(0, g.q_flat)
        return _merge(o_s, lse_s, o_u, lse_u)


def _token_indices(members: list[int], starts: list[int], ext: list[int], device) -> torch.Tensor:
    """[sum(ext)] int64: the step-order rows of ``members``' new tokens, request after request."""
    return torch.tensor([starts[b] + k for b, n in zip(members, ext) for k in range(n)], dtype=torch.int64,
                        device=device)


def _merge(o_s: torch.Tensor, lse_s: torch.Tensor, o_u: torch.Tensor, lse_u: torch.Tensor) -> torch.Tensor:
    """Two partial softmax attentions over disjoint keys, o [T, Hq, D] with their lse [T, Hq], → the
    attention over all of them. Every real query sees itself in the suffix, so lse_u is finite."""
    lse = torch.logaddexp(lse_s, lse_u)  # [T, Hq]
    w_s, w_u = torch.exp(lse_s - lse)[..., None], torch.exp(lse_u - lse)[..., None]
    return (o_s.float() * w_s + o_u.float() * w_u).to(o_s.dtype)


def _attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and its log-sum-exp: q [B, H, M, D], k/v [B, H, N, D], ``bias`` additive
    [B, 1, M, N] (0 or -inf) or None → (o [B, H, M, D], lse [B, H, M] float32).

    On the CPU this is torch's fused flash kernel (an online softmax over blocks of keys: the [M, N]
    scores are never materialised); elsewhere the same math in plain ops. A row whose keys are all
    masked gets o = 0 and an lse that must not be used (the callers drop such rows).
    """
    if q.device.type == "cpu":
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias,
                                                                           scale=scale)
        return o, lse
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [B, H, M, N]
    if bias is not None:
        s = s + bias
    lse = torch.logsumexp(s, -1)  # [B, H, M]
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    return torch.matmul(p, v.float()).to(q.dtype), lse


def _buckets(members: list[int], lens: list[int], ratio: float) -> list[list[int]]:
    """Split ``members`` (longest first) so each bucket's shortest ``lens`` is >= ratio x its longest."""
    out: list[list[int]] = []
    for b in sorted(members, key=lambda b: -lens[b]):
        if out and lens[b] >= ratio * lens[out[-1][0]]:
            out[-1].append(b)
        else:
            out.append([b])
    for bucket in out:
        bucket.sort()  # request order inside a group (decode outputs come back in this order)
    return out
