"""Generation with a shared prompt prefix computed once gives the greedy outputs of generating from whole prompts."""

from sftflow.tasks.evaluation.shared_prefix import prefix_groups


def test_prompts_are_grouped_by_the_prefix_they_share():
    shots = list(range(100))
    prompts = [shots + [7, 8], [5] * 80, shots + [9], shots[:70] + [1, 2], shots + [9, 9, 9], [5] * 80 + [6]]
    groups = {tuple(members): length for length, members in prefix_groups(prompts, min_prefix=64)}
    # 0, 2 and 4 share all 100 examples; 3 shares 70 of them; 1 and 5 share 79 of 1's 80 (1 keeps one to feed)
    assert groups == {(3, 0, 2, 4): 70, (1, 5): 79}
    # prompts sharing nothing long: one group, nothing cached
    assert prefix_groups([shots + [7], [3, 4], shots[:50] + [1]], min_prefix=64) == [(0, [0, 1, 2])]


def test_few_shot_generations_match_lm_evals_own(tiny_model, opinionated_model):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from sftflow.tasks.evaluation.hflm import SharedPrefixHFLM

    shots = "Answer with the letter.\n\n" + "".join(
        f"Q: example {k} about {'apples ' * (k + 3)}\nA: ({'ABC'[k]})\n\n" for k in range(3))
    greedy = {"until": ["\n\n", "Q:"], "max_gen_toks": 12, "do_sample": False}
    # 7 few-shot prompts with questions of different lengths (3 batches of up to 3, padded after the examples),
    # 2 with nothing to share, 2 under other settings
    contexts = [(shots + f"Q: what is {q}? {'x ' * (q % 4)}\nA:", greedy) for q in range(7)]
    contexts += [(f"Unrelated prompt {q}\nA:", greedy) for q in range(2)]
    contexts += [(shots + f"Q: {q}\nA:", {**greedy, "max_gen_toks": 5}) for q in range(2)]
    requests = [Instance(request_type="generate_until", doc={}, arguments=(c, dict(g)), idx=0) for c, g in contexts]
    stock = HFLM(pretrained=opinionated_model, tokenizer=tiny_model, batch_size=3)
    ours = SharedPrefixHFLM(pretrained=opinionated_model, tokenizer=tiny_model, batch_size=3)
    encoded = [ours.tok_batch_encode([c])[0][0].tolist() for c, _ in contexts[:7]]
    assert [(n > 0, len(m)) for n, m in prefix_groups(encoded)] == [(True, 7)]  # they do share their examples
    expected = stock.generate_until(requests, disable_tqdm=True)
    assert len(set(expected)) >= 8  # the outputs depend on the prompt, so a mix-up would show
    assert ours.generate_until(requests) == expected
