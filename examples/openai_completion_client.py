"""Text completion with several choices and token logprobs, using the official `openai` client against jaxserve.

Asks /v1/completions for two completions of one prompt (`n=2`) with the log-probabilities of each generated token
and of the 3 likeliest tokens at each step (`logprobs=3`), without the prompt in the text (`echo=False`), and prints
each choice and its tokens. Sampling is on by default (temperature 0.8): the server rejects greedy sampling with n>1.

Run the server in one terminal and this script in another:

    jaxserve serve
    python examples/openai_completion_client.py
"""

from __future__ import annotations

import sys

from _common import make_client, make_parser, pick_model, run


def main() -> None:
    parser = make_parser(__doc__, default_temperature=0.8)
    parser.add_argument("--prompt", default="Once upon a time, in a small village,", help="the text to complete")
    args = parser.parse_args()

    client = make_client(args)
    model = pick_model(client, args.model)
    response = client.completions.create(
        model=model,
        prompt=args.prompt,
        n=2,
        logprobs=3,
        echo=False,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
    )

    print(f"model: {response.model}")
    print(f"prompt: {args.prompt!r}")
    for choice in response.choices:
        print(f"\n--- choice {choice.index} (finish_reason: {choice.finish_reason})")
        print(choice.text)
        logprobs = choice.logprobs
        if logprobs is None or not logprobs.tokens:
            continue
        print(f"\n{'token':>20}  {'logprob':>9}  top logprobs (the 3 likeliest, plus the chosen token)")
        top_lists = logprobs.top_logprobs or [None] * len(logprobs.tokens)
        for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs or [], top_lists):
            alternatives = ", ".join(f"{alt!r}: {value:.3f}" for alt, value in (top or {}).items())
            shown = f"{logprob:9.3f}" if logprob is not None else f"{'-':>9}"
            print(f"{token!r:>20}  {shown}  {alternatives}")
    usage = response.usage
    if usage is not None:
        print(
            f"\nusage: prompt_tokens={usage.prompt_tokens} completion_tokens={usage.completion_tokens} "
            f"total_tokens={usage.total_tokens}"
        )


if __name__ == "__main__":
    sys.exit(run(main))
