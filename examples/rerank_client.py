"""The /rerank route with plain HTTP: rank documents by relevance to a query and keep the best `top_n`.

Posts `{"model", "query", "documents", "top_n"}` to /rerank (also served as /v1/rerank and /v2/rerank, the
Jina and Cohere spellings) and prints the results, best first, each with its index in the request. Documents may
be strings or `{"text": ...}` objects; this script sends one of each kind.

Run the server in one terminal and this script in another:

    jaxserve serve
    python examples/rerank_client.py
"""

from __future__ import annotations

from _pooling_http import make_parser, post

QUERY = "What is the capital of France?"
DOCUMENTS = [
    "Bananas are rich in potassium.",
    "The capital of Germany is Berlin.",
    {"text": "The capital of France is Paris."},
    "Paris is known for the Eiffel Tower.",
    "Horses and donkeys are closely related.",
]


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--top-n", type=int, default=3, help="results to return (default 3; 0: all)")
    args = parser.parse_args()

    body = {"model": args.model, "query": QUERY, "documents": DOCUMENTS, "top_n": args.top_n}
    reply = post(f"http://{args.host}:{args.port}/rerank", body)
    print(f"query: {QUERY!r}; top {args.top_n} of {len(DOCUMENTS)} documents")
    for rank, result in enumerate(reply["results"], 1):
        print(f"  {rank}. {result['relevance_score']:7.4f}  [{result['index']}] {result['document']['text']!r}")
    print(f"usage: prompt_tokens={reply['usage']['prompt_tokens']}")


if __name__ == "__main__":
    main()
