"""SpecPC in front of a serving engine: the local draft compresses the prompt, an OpenAI-compatible server answers.

Starts nothing: it sends to --base-url (vLLM, SGLang, `transformers serve`, ...) and prints what it sent and the
stats. With no server there, it prints the error and the stats anyway (nothing is lost) and exits 0.

    python examples/specpc_server.py                                   # tiny draft, http://127.0.0.1:8000/v1
    python examples/specpc_server.py --target PATH --draft PATH --model NAME --prompt-format ids
"""

from __future__ import annotations

from hf_specapprox import ServingError, SpecPCClient, SpecPCConfig, SpecPCPreprocessor
from _common import load_models, parser


def main(argv=None):
    cli = parser(__doc__)
    cli.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server's OpenAI API root")
    cli.add_argument("--model", help="the model name the server serves (default: --target, or 'tiny-model')")
    cli.add_argument("--prompt-format", default="auto", choices=["auto", "ids", "text"])
    cli.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the server")
    cli.add_argument("--max-tokens", type=int, default=16)
    cli.add_argument("--stream", action="store_true", help="print the answer as it streams in")
    args = cli.parse_args(argv)
    _, draft, tokenizer, prompt = load_models(args)  # the target stays on the server; only the draft runs here
    specpc = SpecPCPreprocessor(
        draft,
        SpecPCConfig(max_capacity_prompt=192, window_size=32, kernel_size=16, lookahead_tokens=8,
                     starting_layer_index=1 if not args.target else 8),
    )
    client = SpecPCClient(specpc, args.base_url, args.model or args.target or "tiny-model", tokenizer=tokenizer,
                          prompt_format=args.prompt_format, timeout=args.timeout)
    try:
        if args.stream:
            stream = client.complete(prompt, max_tokens=args.max_tokens, stream=True)
            print("answer: ", end="", flush=True)
            for chunk in stream:
                print(chunk, end="", flush=True)
            print()
            result = stream.result
        else:
            result = client.complete(prompt, max_tokens=args.max_tokens)
            print("answer:", result.text)
    except ServingError as error:
        print(f"ServingError: {error}")
        result = error.result
    sent = result.sent_prompt
    shown = sent[:200] + " ..." if isinstance(sent, str) and len(sent) > 200 else sent
    if isinstance(sent, list):
        shown = f"{len(sent)} token ids {sent[:12]} ..."
    print(f"sent ({result.stats['prompt_format']}): {shown}")
    print("stats:", {name: round(value, 4) if isinstance(value, float) else value
                     for name, value in result.stats.items()})
    return result


if __name__ == "__main__":
    main()
