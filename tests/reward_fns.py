"""Reward functions a config names as "tests.reward_fns:NAME" (gptjax/rewards.py)."""

CALLS = []


def short_and_ended(prompts, completions, ended, **kwargs):
    """A verifiable-style reward: 1 for a reply that ended, minus its length / 100."""
    CALLS.append({"prompts": prompts, "completions": completions, "ended": ended, **kwargs})
    return [float(e) - len(c) / 100 for c, e in zip(completions, ended)]


def fails_on_the_second_prompt(prompts, completions, ended):
    if any(p.get("id") == 1 for p in prompts):
        raise KeyError("no answer key for this prompt")
    return [0.0] * len(completions)


def one_value_short(prompts, completions, ended):
    return [0.0] * (len(completions) - 1)


def not_numbers(prompts, completions, ended):
    return ["high"] * len(completions)


def exact_sum(prompts, completions, ended):
    """A verifiable reward for "what is A plus B?" prompts: 1 when the reply says A + B."""
    import re

    out = []
    for p, c in zip(prompts, completions):
        a, b = (int(x) for x in re.findall(r"\d+", p.get("prompt") or p["messages"][0]["content"]))
        out.append(float(str(a + b) in c))
    return out
