"""The model runner: turns a SchedulerOutput into tensors, runs the model, samples.

It owns the device state: the model, the paged KV cache
``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]`` and the sampler.
Inputs, slot mapping included, are built from Python ints in one pass per request (ranges
per block, no per-token tensor ops), then moved to the device in two tensors. On CUDA,
decode-only steps that fit a captured bucket replay a CUDA graph instead
(``decode_graphs``, set by the engine; see ``engine.cuda_graphs``).
"""

from __future__ import annotations

from array import array
from itertools import accumulate

import torch

from engine.attention.metadata import AttentionMetadata
from engine.batch import ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from engine.cpu_kernels_build import load_cpu_kernels
from engine.cuda_graphs import DecodeGraphs
from engine.sampler import Sampler

PROMPT_LOGPROBS_ROWS = 512  # prompt positions scored at once: bounds the [rows, vocab] logits


class ModelRunner:
    # Tensor parallelism's runner cannot score prompt rows (its logits are a collective
    # every rank takes part in once per step): the engine refuses such requests there.
    supports_prompt_logprobs = True

    def __init__(self, model: torch.nn.Module, kv_cache: torch.Tensor, block_size: int,
                 device: torch.device, seed: int = 0) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler(device, seed)
        # CUDA graphs of decode-only steps (engine.cuda_graphs); None: every step eager.
        self.decode_graphs: DecodeGraphs | None = None
        if device.type == "cpu":  # a first build happens now, not in the first request
            load_cpu_kernels()

    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput) -> ModelRunnerOutput:
        hidden, sample_rows = self._forward(batch)
        prompt_logprobs = self._prompt_logprobs(batch, hidden)
        if sample_rows is not None:
            if not sample_rows.numel():
                return ModelRunnerOutput([], None, prompt_logprobs)
            hidden = hidden.index_select(0, sample_rows)
        logits = self.model.compute_logits(hidden)
        requests = [e.request for e in batch.scheduled if e.sample]
        tokens, logprobs = self.sampler(logits, requests)
        return ModelRunnerOutput(tokens, logprobs, prompt_logprobs)

    def _forward(self, batch: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden [T, hidden], the rows sampled, None meaning every row): by a CUDA graph
        replay when the step is decode-only and fits a captured bucket, else eagerly."""
        graphs = self.decode_graphs
        if graphs is not None and batch.num_decodes == len(batch.scheduled):
            hidden = graphs.try_run(batch.scheduled)
            if hidden is not None:
                return hidden, _graph_sample_rows(batch, self.device)
        input_ids, positions, metadata, sample_rows = self._prepare(batch)
        return self.model(input_ids, positions, self.kv_cache, metadata), sample_rows

    def _prompt_logprobs(self, batch: SchedulerOutput, hidden: torch.Tensor) -> dict:
        """request id -> (first position, TokenLogprobs) for each chunk that computes prompt
        positions of a request asking for them: position p's row scores token p + 1."""
        out = {}
        row = 0
        for entry in batch.scheduled:
            request, start, n = entry.request, entry.start, entry.num_new_tokens
            k = request.params.prompt_logprobs
            if k is not None:
                stop = min(start + n, request.num_prompt_tokens - 1)
                if start < stop:
                    targets = request.token_ids[start + 1 : stop + 1]
                    out[request.request_id] = (
                        start + 1, self._score(hidden[row : row + stop - start], targets, k))
            row += n
        return out

    def _score(self, hidden: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprobs]:
        """Log-softmax of the logits of ``hidden`` [n, hidden]: the ``targets``' logprobs
        and ranks and the top-k, in slices of PROMPT_LOGPROBS_ROWS rows (a [rows, vocab]
        float32 block at a time, not the whole prompt's)."""
        target = torch.tensor(targets, dtype=torch.long, device=self.device).unsqueeze(1)
        entries: list[TokenLogprobs] = []
        for i in range(0, len(targets), PROMPT_LOGPROBS_ROWS):
            rows = slice(i, i + PROMPT_LOGPROBS_ROWS)
            lp = torch.log_softmax(self.model.compute_logits(hidden[rows]).float(), dim=-1)
            chosen = lp.gather(1, target[rows])
            ranks = ((lp > chosen).sum(1) + 1).tolist()
            chosen_list = chosen.squeeze(1).tolist()
            if k > 0:
                vals, ids = lp.topk(k, dim=-1)
                tops = [list(zip(a, b, strict=True))
                        for a, b in zip(ids.tolist(), vals.tolist(), strict=True)]
            else:
                tops = [[] for _ in chosen_list]
            entries += map(TokenLogprobs, chosen_list, tops, ranks)
        return entries

    @torch.inference_mode()
    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: each ``(src, dst)`` block's KV (every layer) from src to dst."""
        if copies:
            src, dst = (torch.tensor(ids, dtype=torch.long, device=self.device)
                        for ids in zip(*copies, strict=True))
            # as bytes when the cache is fp8: torch has no index_copy_ for fp8 on CPU
            kv = self.kv_cache.view(torch.uint8) if self.kv_cache.itemsize == 1 else self.kv_cache
            kv.index_copy_(0, dst, kv.index_select(0, src))

    def _prepare(self, batch: SchedulerOutput):
        """(input_ids, positions, metadata, sample_rows) for one step, from two host lists:
        every int64 and every int32 tensor is a slice of one of two tensors (per-tensor
        overhead, not size, dominates at these sizes)."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []
        for entry in batch.scheduled:
            request, start, n = entry.request, entry.start, entry.num_new_tokens
            end, table = start + n, request.block_ids
            if n == 1:  # decode: the common case, no slicing
                input_ids.append(request.token_ids[start])
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                input_ids += request.token_ids[start:end]
                positions += range(start, end)
                slots += _chunk_slots(table, start, end, bs)
            query_lens.append(n)
            seq_lens.append(end)
            tables.append(table)
            if entry.sample:
                sample_rows.append(len(input_ids) - 1)
        T = len(input_ids)
        max_blocks = max(map(len, tables))
        ints = input_ids + positions + slots + sample_rows
        ints32 = [*accumulate(query_lens, initial=0), *accumulate(seq_lens, initial=0), *seq_lens]
        for t in tables:  # block tables, padded with 0 to the longest
            ints32 += t
            ints32 += [0] * (max_blocks - len(t))
        longs = _to_tensor(ints, "q", torch.long, self.device)
        int32s = _to_tensor(ints32, "i", torch.int32, self.device)
        return self._inputs(longs, int32s, T, query_lens, seq_lens, batch.num_decodes)

    def _inputs(self, longs: torch.Tensor, int32s: torch.Tensor, T: int, query_lens: list[int],
                seq_lens: list[int], num_decodes: int):
        """The step's inputs as views of its two packed tensors: ``longs`` = input ids,
        positions, slots [T] each, then the sample rows; ``int32s`` = cu_seqlens_q,
        cu_seqlens_k [S + 1] each, seq_lens [S], block tables [S, max_blocks]. (Tensor-
        parallel ranks other than 0 receive these two tensors from rank 0 and call this.)"""
        S = len(query_lens)
        max_blocks = (int32s.numel() - 3 * S - 2) // S
        metadata = AttentionMetadata(
            slot_mapping=longs[2 * T : 3 * T],
            cu_seqlens_q=int32s[: S + 1],
            cu_seqlens_k=int32s[S + 1 : 2 * S + 2],
            seq_lens=int32s[2 * S + 2 : 3 * S + 2],
            block_tables=int32s[3 * S + 2 :].view(S, max_blocks),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            num_decodes=num_decodes,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
        )
        return longs[:T], longs[T : 2 * T], metadata, longs[3 * T :]


def _graph_sample_rows(batch: SchedulerOutput, device: torch.device) -> torch.Tensor | None:
    """The sampled rows of a decode-only step: None when every row is (the common case:
    only a one-token prompt chunk that is not the prompt's last is not sampled)."""
    rows = [i for i, entry in enumerate(batch.scheduled) if entry.sample]
    if len(rows) == len(batch.scheduled):
        return None
    return torch.tensor(rows, dtype=torch.long, device=device)


def _to_tensor(values: list[int], typecode: str, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """A 1-D tensor of ``values``. Through ``array``: ~4x cheaper than ``torch.tensor`` on a
    list (a few thousand ints per step: ~0.1 ms instead of ~0.35 ms here)."""
    t = torch.frombuffer(array(typecode, values), dtype=dtype)  # keeps the array alive
    return t if device.type == "cpu" else t.to(device)


def _chunk_slots(table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Cache slots of positions start .. end-1: one range per block touched."""
    slots: list[int] = []
    pos = start
    while pos < end:
        block = pos // block_size
        stop = min(end, (block + 1) * block_size)
        base = (table[block] - block) * block_size  # slot = base + position in this block
        slots += range(base + pos, base + stop)
        pos = stop
    return slots
