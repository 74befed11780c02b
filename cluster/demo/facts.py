"""What a reward model knows of the demo world's facts, and what a policy optimised against it
would state: `python -m cluster.demo.facts --policy SFT --reward RM [RM ...]`.

Every question of the world has eight answers in each answer form, one per value of the asked
attribute, one of them true. For each reward model (or ensemble, under each aggregation) this
measures, over the questions of a split:

- `pairs`: how often it scores the true answer above a false one in the same form;
- `top1`: how often the true value is its best of the eight (chance 1/8);
- `kl@b`: the truthful share of the policy that maximises  E[r] - b KL(pi || pi_sft)  among those
  answers, pi*(a) = pi_sft(a) exp(r(a) / b) / Z: where PPO with `ppo.kl.coef` b would go if it
  reached its optimum, restricted to answers that state one value.

`pi_sft` at b = infinity (the `sft` column) is the policy's own truthful share among them. A
reward model below it pulls the policy toward false values as b falls: over-optimisation on
facts, measured in minutes instead of one PPO run per seed (docs/demo.md, "Why not 0.90").

`--sample N` also samples N answers to each question from each `--policy` at temperature 1
and counts the untruthful ones by what they state: no value of the asked attribute, a false
one, or the true one beside a contradiction.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from cluster.demo.vocabulary import ANSWER_TEMPLATES, ATTRIBUTE_VALUES
from cluster.demo.world import HELDOUT_SPLITS, World, words
from cluster.shared.logprobs import response_logprobs
from cluster.shared.reward_folder import is_ensemble, reward_members
from cluster.shared.threads import available_cores, set_torch_threads
from cluster.shared.tokens import pad, prompt_token_ids, response_token_ids
from reward_service.model import RewardModel
from reward_service.rewards import AGGREGATIONS


@dataclass(frozen=True)
class Question:
    prompt: str
    answers: tuple[str, ...]
    """Every value of the asked attribute in every answer form of the prompt's kind."""
    true: tuple[bool, ...]


def questions(world: World, prompts: list[str]) -> list[Question]:
    """The fact questions among `prompts` (kind prompts state no asked fact), with their answers."""
    out = []
    for prompt in prompts:
        spec = world.spec(prompt)
        if spec.kind == "kind":
            continue
        truth = world.facts[spec.entity][spec.attribute]
        forms = ANSWER_TEMPLATES[spec.attribute] if spec.kind == "question" else ("{Value}.",)
        pairs = [
            (form.format(name=spec.entity, value=value, Value=value[0].upper() + value[1:]), value == truth)
            for value in ATTRIBUTE_VALUES[spec.attribute]
            for form in forms
        ]
        out.append(Question(prompt, tuple(a for a, _ in pairs), tuple(t for _, t in pairs)))
    return out


@torch.inference_mode()
def policy_logprobs(policy: str | Path, qs: list[Question]) -> list[torch.Tensor]:
    """log pi(answer | prompt) of every answer (its tokens and EOS), one (A,) tensor a question."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    out = []
    for q in qs:
        prompt = prompt_token_ids(tokenizer, q.prompt)
        sequences = [prompt + response_token_ids(tokenizer, a) for a in q.answers]
        input_ids, attention_mask = pad(sequences, tokenizer.pad_token_id)
        offset = len(prompt) - 1  # the position that predicts the first answer token
        mask = torch.zeros(len(sequences), input_ids.shape[1] - 1 - offset)
        for i, s in enumerate(sequences):
            mask[i, : len(s) - len(prompt)] = 1.0
        out.append(response_logprobs(model, input_ids, attention_mask, mask, offset)[0].sum(1))
    return out


def member_scores(reward: str | Path, qs: list[Question]) -> list[torch.Tensor]:
    """Each member's score of every answer: one (K, A) tensor a question (K = 1 for one model)."""
    folders = list(reward_members("reward", reward).values()) if is_ensemble(reward) else [Path(reward)]
    models = [RewardModel.load(folder) for folder in folders]
    return [torch.tensor([m.score([q.prompt] * len(q.answers), list(q.answers)) for m in models]) for q in qs]


def aggregate(scores: torch.Tensor, aggregation: str, std_coef: float = 1.0) -> torch.Tensor:
    """(K, A) member scores -> (A,) model scores, as the reward service aggregates an item."""
    f = AGGREGATIONS[aggregation]
    return torch.tensor([f(column.tolist(), std_coef) for column in scores.T])


def fact_figures(qs: list[Question], logprobs: list[torch.Tensor], scores: list[torch.Tensor], betas) -> dict:
    """{"pairs", "top1", "kl@b" for b in betas} for (A,) scores of every question."""
    pairs = top1 = 0.0
    optimum = dict.fromkeys(betas, 0.0)
    for q, logp, r in zip(qs, logprobs, scores, strict=True):
        true = torch.tensor(q.true)
        by_value = r.view(len(q.true) // true.sum().item(), -1)  # (values, forms): answers go value by value
        right = int(true.view_as(by_value)[:, 0].nonzero())
        pairs += (by_value[right] > torch.cat([by_value[:right], by_value[right + 1 :]])).float().mean().item()
        top1 += float(true[r.argmax()])
        for b in betas:
            optimum[b] += torch.softmax(logp + r / b, 0)[true].sum().item()
    n = len(qs)
    return {"pairs": pairs / n, "top1": top1 / n, **{f"kl@{b:g}": v / n for b, v in optimum.items()}}


@torch.inference_mode()
def untruthful_answers(world: World, policy: str | Path, qs: list[Question], n: int, seed: int = 0) -> dict:
    """Sample `n` answers a question from `policy` (temperature 1, at most 24 tokens) and count
    them: {"answers", "untruthful", "no value", "false value", "contradiction"}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    counts = dict.fromkeys(("answers", "untruthful", "no value", "false value", "contradiction"), 0)
    for q in qs:
        prompt = torch.tensor([prompt_token_ids(tokenizer, q.prompt)]).repeat(n, 1)
        out = model.generate(
            prompt,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=24,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        spec = world.spec(q.prompt)
        values = {v.lower() for v in ATTRIBUTE_VALUES[spec.attribute]}
        for ids in out[:, prompt.shape[1] :]:
            answer = tokenizer.decode(ids, skip_special_tokens=True)
            counts["answers"] += 1
            if world.judge(q.prompt, answer).truthful:
                continue
            stated = {w.split("'", 1)[0] for w in words(answer)} & values  # as the judge reads "Oslo's"
            true = world.facts[spec.entity][spec.attribute].lower()
            counts["untruthful"] += 1
            counts["no value" if not stated else "contradiction" if true in stated else "false value"] += 1
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cluster.demo.facts", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--policy", required=True, nargs="+", help="the policy the reward pulls from (the SFT model) first"
    )
    parser.add_argument("--reward", nargs="+", help="reward model or ensemble folders")
    parser.add_argument("--split", default="validation", choices=("train", *HELDOUT_SPLITS))
    parser.add_argument("--beta", type=float, nargs="+", default=[0.4, 0.2, 0.1], help="KL coefficients")
    parser.add_argument("--std-coef", type=float, default=1.0, help="for mean_minus_std")
    parser.add_argument("--sample", type=int, default=0, metavar="N", help="answers sampled a question per policy")
    args = parser.parse_args(argv)
    set_torch_threads(available_cores())
    world = World.build(0)
    prompts = world.train_prompts() if args.split == "train" else world.heldout_prompts(args.split)
    qs = questions(world, prompts)
    for policy in args.policy if args.sample else ():
        counts = untruthful_answers(world, policy, qs, args.sample)
        print(f"{policy}: " + ", ".join(f"{k} {v}" for k, v in counts.items()), flush=True)
    logprobs = policy_logprobs(args.policy[0], qs)
    sft = sum(torch.softmax(lp, 0)[torch.tensor(q.true)].sum().item() for q, lp in zip(qs, logprobs)) / len(qs)
    print(f"{len(qs)} {args.split} questions; the policy's truthful share among one-value answers: {sft:.3f}")
    for reward in args.reward or ():
        scores = member_scores(reward, qs)
        rows = {f"member-{k}": [s[k] for s in scores] for k in range(len(scores[0]))}
        if len(rows) > 1:
            rows.update({name: [aggregate(s, name, args.std_coef) for s in scores] for name in AGGREGATIONS})
        for name, column in rows.items():
            figures = fact_figures(qs, logprobs, column, args.beta)
            print(f"{reward} {name:>14}: " + "  ".join(f"{k} {v:.3f}" for k, v in figures.items()), flush=True)


if __name__ == "__main__":
    main()
