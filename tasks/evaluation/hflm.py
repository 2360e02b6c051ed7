"""lm-eval's HF model, generating greedily with a prompt prefix shared by several items computed once
(shared_prefix.py): a BBH subtask's description and few-shot examples are most of each of its prompts."""

from __future__ import annotations

import json

from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from sftflow.tasks.evaluation.shared_prefix import generate_after_prefix, prefix_groups


class SharedPrefixHFLM(HFLM):
    """Greedy generation for prompts sharing a long prefix goes through shared_prefix; the rest through lm-eval's own
    path: sampling, prompts it would truncate, prompts that share nothing long."""

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Running generate_until requests")
        stock: list[int] = []
        by_settings: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            by_settings.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        for indices in by_settings.values():
            kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self.max_gen_toks)
            if (kwargs.pop("do_sample", False) or self.backend != "causal" or self.think_end_token is not None
                    or not isinstance(self.batch_size, int)):
                stock += indices
                continue
            until = handle_stop_sequences(kwargs.pop("until", None),
                                          eos=self.tok_decode(self.eot_token_id, skip_special_tokens=False))
            max_gen_toks = kwargs.pop("max_gen_toks")
            kwargs.pop("max_length", None)

            def generate(ids, attention, **cache):
                return self._model_generate(context=ids, attention_mask=attention, stop=until, do_sample=False,
                                            max_length=ids.shape[1] + max_gen_toks, **cache, **kwargs)

            encoded = [self.tok_batch_encode([requests[i].args[0]])[0][0].tolist() for i in indices]
            for length, members in prefix_groups(encoded):
                if not length or any(len(encoded[m]) > self.max_length - max_gen_toks for m in members):
                    stock += [indices[m] for m in members]
                    continue
                new = generate_after_prefix(self.model, [encoded[m] for m in members], length, self.batch_size,
                                            self.tokenizer.pad_token_id, generate)
                for m, tokens in zip(members, new):
                    out[indices[m]] = postprocess_generated_text(self.tok_decode(tokens), until, None)
                    self.cache_hook.add_partial("generate_until", requests[indices[m]].args, out[indices[m]])
                bar.update(len(members))
        if stock:
            for i, text in zip(stock, super().generate_until([requests[i] for i in stock], disable_tqdm=True)):
                out[i] = text
            bar.update(len(stock))
        bar.close()
        return out
