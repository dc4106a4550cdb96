"""Multi-vector embeddings (one vector per token, as late-interaction retrieval uses) from /pooling with plain HTTP.

Posts a batch of four texts to /pooling without a `task`; an embedding model then answers with its token-level
output (`token_embed`), one [num_tokens, dim] matrix per text, and this script prints each matrix's shape.

Run the server in one terminal and this script in another:

    jaxserve serve
    python examples/multi_vector_retrieval_client.py
"""

from __future__ import annotations

from _pooling_http import make_parser, post

TEXTS = [
    "The capital of France is Paris.",
    "Paris",
    "Late interaction keeps one embedding per token and matches queries to documents token by token.",
    "The Eiffel Tower was completed in 1889.",
]


def main() -> None:
    parser = make_parser(__doc__)
    args = parser.parse_args()

    reply = post(f"http://{args.host}:{args.port}/pooling", {"model": args.model, "input": TEXTS})
    for item in reply["data"]:
        matrix = item["data"]
        print(f"{TEXTS[item['index']]!r}\n  -> [{len(matrix)}, {len(matrix[0])}]  ([num_tokens, dim])")
    print(f"usage: prompt_tokens={reply['usage']['prompt_tokens']}")


if __name__ == "__main__":
    main()
