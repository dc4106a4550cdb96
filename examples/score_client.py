"""The /score route with plain HTTP: how well each of several documents matches one query.

Posts `{"model", "queries": "...", "documents": [...]}` to /score and prints one score per document. With an
embedding model (the default, all-MiniLM-L6-v2) the score is the cosine similarity of the two embeddings; with a
cross-encoder (a classifier with one label) it is the model's output for the pair.

Run the server in one terminal and this script in another:

    jaxserve serve
    python examples/score_client.py
"""

from __future__ import annotations

from _pooling_http import make_parser, post

QUERY = "What is the capital of France?"
DOCUMENTS = [
    "The capital of France is Paris.",
    "Paris is known for the Eiffel Tower.",
    "The capital of Germany is Berlin.",
    "Bananas are rich in potassium.",
]


def main() -> None:
    parser = make_parser(__doc__)
    args = parser.parse_args()

    body = {"model": args.model, "queries": QUERY, "documents": DOCUMENTS}
    reply = post(f"http://{args.host}:{args.port}/score", body)
    print(f"query: {QUERY!r}")
    for item in reply["data"]:
        print(f"  {item['score']:7.4f}  {DOCUMENTS[item['index']]!r}")
    print(f"usage: prompt_tokens={reply['usage']['prompt_tokens']}")


if __name__ == "__main__":
    main()
