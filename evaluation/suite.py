"""`EvalSuite`: score a live model on one split of a suite with forward passes only.

    suite = EvalSuite(load_suite("zh-instruct-lite"), tokenizer, "dev", batch_size=32)
    suite.score(model).score                  # one number; .tasks: task -> metric -> value
    for shard in suite.score_shards(model, order):   # the same, shard by shard, for a pruner
        report(shard.examples)                # example -> its value, keyed as suite.example_keys

Everything that does not depend on the weights is done once in the constructor: prompts are
rendered (lm-eval's way, see prompts.py), tokenized, packed into fixed batches sorted by length,
with the gather indices of the scored positions. A call then runs one forward pass per batch
under `torch.inference_mode()` and applies the output head only at the scored positions.

Semantics (metric names as lm-eval's):
- choice: log-likelihood of delimiter + option after the prompt; the highest wins, ties to the
  first option. `acc`; `acc_norm` divides each log-likelihood by the option's length in
  characters; `answer_logprob` is the gold option's log-probability under a softmax over the
  item's options (the negative option cross-entropy, the smooth metric of the kind). An item's options share one trie row (packing.py), with the log-likelihoods they
  would get on rows of their own.
- reference: `logprob`, the mean per-token log-probability of the reference (unbounded), and
  `prob` = exp(logprob) in (0, 1], the per-token geometric-mean probability, which aggregates.
- reference under a chat template: the reference is followed by the template's end-of-turn
  token (`<|eot_id|>`), scored with it.
- generate: greedy decoding; `exact_match` and `contains` after `normalize_answer`.
- verifiable: greedy decoding, then every constraint of the item checked by code
  (verifiable.py): IFEval's prompt- and instruction-level strict and loose accuracies.
- generate and verifiable: `zh_fidelity`, the share of answers written in simplified Chinese.
- lmeval entries: lm-eval's own metrics (lmeval.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from evaluation.ceval import LETTERS, description, letters_text, subject_from_path
from evaluation.errors import EvalError
from evaluation.generate import GenBatch, generate, pack_prompts
from evaluation.packing import Batch, Prefix, accumulate_logprobs, build_rows, pack_rows, run_batches
from evaluation.prompts import (answer_metrics, encode_pair, end_of_turn, lm_encode, render_prompt, target_delimiter,
                                uses_chat)
from evaluation.tasks import GENERATED_KINDS, METRICS, POOLED_METRICS, Suite, Task
from evaluation.verifiable import metrics as verifiable_metrics
from evaluation.verifiable import zh_fidelity

# The default metric of each kind that enters the suite score (a task's `metric:` overrides it).
PRIMARY_METRIC = {"choice": "acc", "reference": "prob", "generate": "exact_match",
                  "verifiable": "prompt_level_strict_acc", "lmeval": "acc"}

__all__ = ["EvalSuite", "PRIMARY_METRIC", "ShardScore", "SuiteResult", "encode_pair", "render_prompt"]


@dataclass
class SuiteResult:
    score: float  # weighted mean of each task's primary metric
    tasks: dict[str, dict[str, float]]  # task -> metric -> value
    examples: dict[str, float] = field(default_factory=dict, repr=False)  # "task/id" -> primary metric
    objective: float = float("nan")  # weighted mean of the suite's `metric` (= score for "primary")
    objective_examples: dict[str, float] = field(default_factory=dict, repr=False)  # "task/id" -> that metric

    def as_dict(self) -> dict:
        return {"score": self.score, "tasks": self.tasks}


@dataclass
class ShardScore:
    index: int  # the shard's own index (shards may run in any order)
    n_shards: int
    examples: dict[str, float]  # this shard's examples: "task/id" -> the suite's `metric`
    result: SuiteResult  # every example scored so far (tasks not reached yet are left out)


@dataclass
class _Plan:
    task: Task
    items: list[dict]
    first_seq: list[int] = field(default_factory=list)  # per item: its first sequence
    chars: list[list[int]] = field(default_factory=list)  # choice: option lengths in characters


@dataclass
class _Shard:
    examples: list[tuple[int, int]]  # (plan index, item index)
    batches: list[Batch] = field(default_factory=list)
    prefix: Prefix | None = None  # what the shard's rows begin with in common, run once per call
    gen_batches: list[GenBatch] = field(default_factory=list)


class EvalSuite:
    """One split of a suite, tokenized once, scored on any model that shares the tokenizer.

    chat: None follows each task, then the suite: the tokenizer's chat template where it has one,
    except for C-Eval data and lm-eval tasks (only when they say `chat: true`); True uses the
    template for every task, False for none. system: a system prompt for every task
    that sets none. shards: score in this many shards (each example in one, interleaved).
    metric: "primary" (each task's primary metric) or "smooth" (its smooth metric, see
    tasks.SMOOTH_METRIC) makes `objective`; `score` is always the primary one.
    share_context: score an item's options on one trie row (the context computed once), and run
    the tokens that a batch's rows all begin with (template, system prompt, instruction) once.
    max_length: longest model input; longer ones lose their oldest context tokens, as lm-eval's.
    share_prefix: run the batch's common prefix once (default: share_context); False puts it in
    every row (no key-value cache: what activation checkpointing needs, search/learn.py).
    """

    def __init__(self, suite: Suite, tokenizer, split: str, *, batch_size: int = 32,
                 device: str | torch.device = "cpu", chat: bool | None = None, system: str | None = None,
                 max_length: int | None = None, shards: int = 1, share_context: bool = True,
                 metric: str = "primary", share_prefix: bool | None = None):
        if batch_size < 1:
            raise EvalError(f"batch_size must be at least 1 but got {batch_size}")
        if shards < 1:
            raise EvalError(f"shards must be at least 1 but got {shards}")
        if metric not in ("primary", "smooth"):
            raise EvalError(f"metric must be 'primary' or 'smooth' but got {metric!r}")
        self.metric = metric
        self.suite, self.split, self.device = suite, split, torch.device(device)
        self.tokenizer, self.batch_size, self.max_length = tokenizer, batch_size, max_length
        # lm-eval entries serve the splits they name (every split when they name none)
        self.tasks: list[Task] = [t for t in suite.tasks if not t.lm_splits or split in t.lm_splits]
        self._chat, self._system = chat, system
        pad = tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

        self._plans: list[_Plan] = []
        seqs: list[tuple[list[int], list[int]]] = []  # (model input, scored tail tokens) per sequence
        prompts: dict[tuple[int, int], list[int]] = {}  # generate: (plan, item) -> prompt tokens
        for task in (t for t in self.tasks if t.kind != "lmeval"):
            plan = _Plan(task, task.items(split))
            chat_t, system_t = self.settings(task)
            pi = len(self._plans)
            for ii, item in enumerate(plan.items):
                if task.kind in GENERATED_KINDS:
                    text = item.get("passage", "") + ("\n\n" if "passage" in item else "") + item["text"]
                    ctx = render_prompt(tokenizer, text, system_t, chat_t, task.preamble or "")
                    prompts[pi, ii] = lm_encode(tokenizer, ctx)
                    continue
                ctx, conts, chars = self._loglik_prompt(task, item, chat_t, system_t)
                plan.first_seq.append(len(seqs))
                plan.chars.append(chars)
                for cont in conts:
                    seqs.append(self._sequence(task, item, ctx, cont))
            self._plans.append(plan)
        self.n_sequences = len(seqs)
        self._n_tokens = torch.tensor([len(t) for _, t in seqs], dtype=torch.float64)
        self._share_prefix = share_context if share_prefix is None else share_prefix
        self._shards = self._build_shards(seqs, prompts, shards, share_context)
        # A fixed order of every example: its index is the example's stable integer id (a step)
        self.example_keys = [self._key(pi, ii) for s in self._shards for pi, ii in s.examples]
        self.example_index = {k: i for i, k in enumerate(self.example_keys)}

        self._lm_tasks = [t for t in self.tasks if t.kind == "lmeval"]
        self._lmeval = None
        if self._lm_tasks:
            from evaluation.lmeval import LMEvalRunner

            settings = {t.name: self.settings(t) for t in self._lm_tasks}
            self._lmeval = LMEvalRunner(self._lm_tasks, tokenizer, batch_size=batch_size, settings=settings,
                                        max_length=max_length)

    # ------------------------------------------------------------------ construction

    def settings(self, task: Task) -> tuple[bool, str | None]:
        """(use the chat template, system prompt) of one task: its own setting, else the suite's.

        The constructor's chat (True/False) decides for every task; its system prompt goes to
        every task that sets none (before the suite's)."""
        if self._chat is not None:
            chat = self._chat
        elif task.chat is not None:
            chat = task.chat
        elif self.suite.chat is not None:
            chat = self.suite.chat
        else:  # C-Eval data and lm-eval tasks are scored without a template unless asked
            chat = task.layout != "ceval" and task.kind != "lmeval"
        chat = uses_chat(self.tokenizer, chat)
        system = task.system if task.system is not None else self._system if self._system is not None else self.suite.system
        return chat, system

    def _loglik_prompt(self, task: Task, item: dict, chat: bool, system: str | None):
        passage = item["passage"] + "\n\n" if "passage" in item else ""
        preamble = task.preamble or ""
        if task.kind == "reference":
            answers = [item["reference"] + (end_of_turn(self.tokenizer) if chat else "")]
            text = passage + item["text"]
        elif (task.style or ("letters" if task.layout == "ceval" else "cloze")) == "letters":
            answers = list(LETTERS[: len(item["choices"])])
            text = passage + letters_text(item["text"], item["choices"])
            if task.preamble is None and task.layout == "ceval":
                preamble = description(task.subject or subject_from_path(task.file(self.split)))
        else:
            answers, text = item["choices"], passage + item["text"]
        ctx = render_prompt(self.tokenizer, text, system, chat, preamble)
        delim = target_delimiter(self.tokenizer, chat, task.target_delimiter)
        return ctx, [delim + a for a in answers], [len(a) for a in answers]

    def _sequence(self, task: Task, item: dict, ctx: str, cont: str) -> tuple[list[int], list[int]]:
        # lm-eval's whitespace move for choices (parity); a reference is scored on its own tokens.
        c, r = encode_pair(self.tokenizer, ctx, cont, move_whitespace=task.kind == "choice")
        if not c or not r:
            raise EvalError(f"{task.file(self.split)}: item {item['id']!r}: empty "
                            f"{'prompt' if not c else 'answer'} after tokenization")
        toks = c + r
        if self.max_length and len(toks) > self.max_length + 1:
            if len(r) > self.max_length:
                raise EvalError(f"{task.file(self.split)}: item {item['id']!r}: the answer has {len(r)} tokens, "
                                f"more than max_length {self.max_length}")
            toks = toks[-(self.max_length + 1):]  # as lm-eval: drop the oldest context
        return toks[:-1], r  # the last token is never an input

    def _build_shards(self, seqs, prompts, n: int, share: bool) -> list[_Shard]:
        shards = [_Shard([]) for _ in range(n)]
        for pi, plan in enumerate(self._plans):
            for ii in range(len(plan.items)):
                shards[ii % n].examples.append((pi, ii))
        for shard in shards:
            items, gen = [], {}
            for pi, ii in shard.examples:
                plan = self._plans[pi]
                if plan.task.kind in GENERATED_KINDS:
                    gen.setdefault(pi, []).append(ii)
                    continue
                first = plan.first_seq[ii]
                items.append([(s, *seqs[s]) for s in range(first, first + len(plan.chars[ii]))])
            rows = build_rows(items, share)
            shard.batches, shard.prefix = pack_rows(rows, self.batch_size, self._pad_id, self.device,
                                                    share_prefix=self._share_prefix)
            for pi, iis in gen.items():
                t = self._plans[pi].task
                shard.gen_batches += pack_prompts([prompts[pi, ii] for ii in iis], [(pi, ii) for ii in iis],
                                                  self.batch_size, self._pad_id, t.max_new_tokens, t.stop, self.device)
        return shards

    def objective_metric(self, task: Task) -> str:
        return task.smooth_metric if self.metric == "smooth" else task.primary_metric

    def score_terms(self) -> dict[str, dict]:
        """What the suite score is made of: per task (in order) its kind, the metric that enters
        the weighted mean, and its weight."""
        return {t.name: {"kind": t.kind, "metric": t.primary_metric, "weight": t.weight} for t in self.tasks}

    # ------------------------------------------------------------------ scoring

    @property
    def n_shards(self) -> int:
        return len(self._shards)

    def _key(self, pi: int, ii: int) -> str:
        plan = self._plans[pi]
        return f"{plan.task.name}/{plan.items[ii]['id']}"

    def sequence_logprobs(self, model) -> torch.Tensor:
        """Summed log-probability of every scored continuation, float64 [n_sequences] on CPU."""
        totals = torch.zeros(self.n_sequences, dtype=torch.float64, device=self.device)
        for shard in self._shards:
            run_batches(model, shard.batches, totals, shard.prefix)
        return totals.cpu()

    def _item_metrics(self, plan: _Plan, ii: int, lp: torch.Tensor) -> dict[str, float]:
        first = plan.first_seq[ii]
        if plan.task.kind == "reference":
            mean = float(lp[first]) / float(self._n_tokens[first])
            return {"prob": math.exp(mean), "logprob": mean}
        options = lp[first : first + len(plan.chars[ii])]
        lls = options.tolist()
        norm = [ll / c for ll, c in zip(lls, plan.chars[ii])]
        gold = plan.items[ii]["answer"]
        # max() keeps the first of equal values: ties go to the first option, as np.argmax.
        pick = max(range(len(lls)), key=lambda k: lls[k])
        pick_norm = max(range(len(norm)), key=lambda k: norm[k])
        answer_logprob = lls[gold] - float(torch.logsumexp(options, 0))
        return {"acc": float(pick == gold), "acc_norm": float(pick_norm == gold), "answer_logprob": answer_logprob}

    def _generated_metrics(self, plan: _Plan, ii: int, text: str) -> dict[str, float]:
        item = plan.items[ii]
        out = verifiable_metrics(item, text) if plan.task.kind == "verifiable" else answer_metrics(text, item["answers"])
        out["zh_fidelity"] = zh_fidelity(text)
        return out

    @staticmethod
    def _mean(plan: _Plan, done: dict[int, dict[str, float]], order: list[int], metric: str) -> float:
        """A task's value of `metric` over its scored items; instruction-level accuracies of a
        verifiable task pool every check (each item weighted by its number of checks), as IFEval."""
        if plan.task.kind == "verifiable" and metric in POOLED_METRICS:
            n = [len(plan.items[i]["checks"]) for i in order]
            return sum(done[i][metric] * k for i, k in zip(order, n)) / sum(n)
        return sum(done[i][metric] for i in order) / len(order)

    @property
    def n_batches(self) -> int:
        """Forward and generation batches of one full scoring (what `on_batch` counts)."""
        return sum(len(s.batches) + len(s.gen_batches) for s in self._shards)

    LOSSES = ("ce", "entropy")

    def loss_tasks(self, loss: str = "ce") -> dict[str, list[str]]:
        """The example keys each task gives the learning loss `loss`, by task: choice and
        reference tasks for "ce", choice tasks for "entropy" (see `loss_parts`)."""
        kinds = ("choice", "reference") if loss == "ce" else ("choice",)
        return {p.task.name: [self._key(pi, ii) for ii in range(len(p.items))]
                for pi, p in enumerate(self._plans) if p.task.kind in kinds and p.items}

    def _loss_groups(self) -> list[tuple[int, list[int], list[tuple[int, int]]]]:
        """(shard, batch indices, items (plan, item)) whose log-likelihoods those batches hold in
        full: a trie row holds every option of its item, so a group is one batch, unless the
        options were packed apart (share_context=False), which joins their batches."""
        if getattr(self, "_groups", None) is not None:
            return self._groups
        where: dict[int, tuple[int, int]] = {}  # sequence -> (shard, batch)
        for si, shard in enumerate(self._shards):
            for bi, b in enumerate(shard.batches):
                for s in b.sequences.unique().tolist():
                    where[s] = (si, bi)
        groups = []
        for si, shard in enumerate(self._shards):
            parent = list(range(len(shard.batches)))

            def root(i):
                while parent[i] != i:
                    parent[i] = parent[parent[i]]
                    i = parent[i]
                return i

            items = [(pi, ii) for pi, ii in shard.examples if self._plans[pi].task.kind in ("choice", "reference")]
            for pi, ii in items:
                first = self._plans[pi].first_seq[ii]
                bs = [where[s][1] for s in range(first, first + len(self._plans[pi].chars[ii]))]
                for b in bs[1:]:
                    parent[root(b)] = root(bs[0])
            by_root: dict[int, tuple[list[int], list]] = {}
            for bi in range(len(shard.batches)):
                by_root.setdefault(root(bi), ([], []))[0].append(bi)
            for pi, ii in items:
                by_root[root(where[self._plans[pi].first_seq[ii]][1])][1].append((pi, ii))
            groups += [(si, bis, its) for bis, its in by_root.values() if its]
        self._groups = groups
        return groups

    def loss_parts(self, model, *, loss: str = "ce", holdout: frozenset[str] | set[str] = frozenset(),
                   held: list[float] | None = None) -> Iterator[torch.Tensor]:
        """The learning loss of `model` in parts, one per batch (run with gradients on and
        backpropagate each part on its own: one batch's activations alive at a time); the parts
        sum to the loss over the examples not in `holdout`. The held-out examples' loss, from the
        same forward passes, is appended to `held` per part (detached).

        "ce": minus the smooth objective, the task-weighted mean of each choice item's
        `answer_logprob` (the log of the softmax over its options' log-likelihoods at the gold
        answer) and each reference item's `logprob` (mean token log-likelihood), from the same
        rows, prompts and shared prefixes as `score`. "entropy": the task-weighted mean entropy
        of that softmax over the choice items (AdaMerging's unlabeled objective). Generate,
        verifiable and lm-eval tasks have no log-likelihood to learn from and are left out."""
        if loss not in self.LOSSES:
            raise EvalError(f"loss must be one of {', '.join(self.LOSSES)} but got {loss!r}")
        tasks = self.loss_tasks(loss)
        if not tasks:
            raise EvalError(f"the suite has no {'choice or reference' if loss == 'ce' else 'choice'} task on split "
                            f"{self.split!r}: nothing to learn from")
        weight = {t.name: t.weight for t in self.tasks}
        coef: dict[str, float] = {}
        for part in (lambda k: k not in holdout, lambda k: k in holdout):
            chosen = {t: [k for k in keys if part(k)] for t, keys in tasks.items()}
            total = sum(weight[t] for t, keys in chosen.items() if keys)
            for t, keys in chosen.items():
                for k in keys:
                    coef[k] = weight[t] / (len(keys) * total)
        n_tokens = self._n_tokens.to(self.device)
        for si, bis, items in self._loss_groups():
            shard = self._shards[si]
            lp = torch.zeros(self.n_sequences, dtype=torch.float64, device=self.device)
            accumulate_logprobs(model, [shard.batches[b] for b in bis], lp, shard.prefix)
            fit, out = lp.new_zeros(()), lp.new_zeros(())
            for pi, ii in items:
                plan, key = self._plans[pi], self._key(pi, ii)
                if plan.task.name not in tasks:
                    continue
                first = plan.first_seq[ii]
                if plan.task.kind == "reference":
                    term = -lp[first] / n_tokens[first]
                else:
                    options = lp[first: first + len(plan.chars[ii])]
                    logp = options - torch.logsumexp(options, 0)
                    term = -(logp.exp() * logp).sum() if loss == "entropy" else -logp[plan.items[ii]["answer"]]
                if key in holdout:
                    out = out + coef[key] * term.detach()
                else:
                    fit = fit + coef[key] * term
            if held is not None:
                held.append(float(out))
            yield fit

    def smooth_loss(self, model) -> torch.Tensor:
        """Minus the suite's smooth objective, differentiable in `model`'s parameters (run it with
        gradients on): `loss_parts` summed into one tensor (one graph over the whole split)."""
        return sum(self.loss_parts(model), torch.zeros((), dtype=torch.float64, device=self.device))

    def score_shards(self, model, order: list[int] | None = None, on_batch=None) -> Iterator[ShardScore]:
        """Score shard by shard (in `order`, default 0..n-1); each yields its examples' value of
        the suite's metric and the running result over every example scored so far.
        `on_batch()` is called after every batch (a progress bar's tick)."""
        order = list(range(len(self._shards))) if order is None else list(order)
        if sorted(order) != list(range(len(self._shards))):
            raise EvalError(f"order must be a permutation of the {len(self._shards)} shards but got {order}")
        lp = torch.zeros(self.n_sequences, dtype=torch.float64, device=self.device)
        done: dict[int, dict[int, dict[str, float]]] = {pi: {} for pi in range(len(self._plans))}
        lm_metrics: dict[str, dict[str, float]] = {}
        for n_done, index in enumerate(order, start=1):
            shard = self._shards[index]
            run_batches(model, shard.batches, lp, shard.prefix, on_batch)
            lp_cpu = lp.cpu()
            for gb in shard.gen_batches:
                for (pi, ii), text in zip(gb.examples, generate(model, self.tokenizer, gb, self._pad_id)):
                    done[pi][ii] = self._generated_metrics(self._plans[pi], ii, text)
                if on_batch is not None:
                    on_batch()
            examples = {}
            for pi, ii in shard.examples:
                plan = self._plans[pi]
                if plan.task.kind not in GENERATED_KINDS:
                    done[pi][ii] = self._item_metrics(plan, ii, lp_cpu)
                examples[self._key(pi, ii)] = done[pi][ii][self.objective_metric(plan.task)]
            if n_done == len(order) and self._lmeval is not None:
                lm_metrics = self._lmeval.run(model)
            yield ShardScore(index, len(self._shards), examples, self._result(done, lm_metrics))

    def score(self, model, on_batch=None) -> SuiteResult:
        """Score `model` (any causal LM sharing the tokenizer) on this split."""
        result = None
        for shard in self.score_shards(model, on_batch=on_batch):
            result = shard.result
        return result

    def _result(self, done, lm_metrics) -> SuiteResult:
        tasks, examples, objective_examples = {}, {}, {}
        for pi, plan in enumerate(self._plans):
            if not done[pi]:
                continue
            order = sorted(done[pi])  # item order, so the means do not depend on the sharding
            names = METRICS[plan.task.kind]
            tasks[plan.task.name] = {m: self._mean(plan, done[pi], order, m) for m in names}
            examples.update({self._key(pi, i): done[pi][i][plan.task.primary_metric] for i in order})
            metric = self.objective_metric(plan.task)
            objective_examples.update({self._key(pi, i): done[pi][i][metric] for i in order})
        tasks.update(lm_metrics)
        score = self._weighted(tasks, lambda t: t.primary_metric)
        objective = self._weighted(tasks, self.objective_metric)
        return SuiteResult(score=score, tasks=tasks, examples=examples, objective=objective,
                           objective_examples=objective_examples)

    def _weighted(self, tasks: dict, metric_of) -> float:
        """The weighted mean over the tasks scored so far of each one's `metric_of(task)`."""
        weighted = weights = 0.0
        for task in self.tasks:
            if task.name in tasks:
                weighted += task.weight * tasks[task.name][metric_of(task)]
                weights += task.weight
        value = weighted / weights if weights else float("nan")  # nan: a shard with no examples
        if weights and not math.isfinite(value):
            raise EvalError(f"suite {self.suite.name!r}: the model produced a non-finite score")
        return value
