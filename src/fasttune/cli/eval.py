"""`fasttune eval`: a model on a prepared split (loss, perplexity, generation metrics), optionally scored by
an LLM judge and compared with another model; one JSON report.

    fasttune eval --run OUT                                   # OUT/model or OUT/adapter on OUT/data
    fasttune eval --model DIR [--adapter DIR] --data DATA_DIR [--split test] [--max-examples N | --all]
    fasttune eval --run OUT --judge-url http://host:8000/v1 --judge-model NAME [--rubric FILE]
    fasttune eval --run OUT --compare OTHER_DIR --judge-url ... --judge-model ...   # + pairwise A/B

The report (default OUT/eval.json with --run, else ./eval.json) is written as soon as the generations are
done and again with the judge's results; the judge's answers go to a cache beside it
(`<report>.judge.jsonl`) line by line, so an interrupted judging resumes with the same command.
"""

from __future__ import annotations

import gc
from pathlib import Path

from fasttune.choices import SPLITS
from fasttune.cli.options import add_device, add_dtype, add_sampling
from fasttune.errors import FasttuneError


def add_subparser(sub) -> None:
    from fasttune.train.config import EVAL_EXAMPLES  # torch-free: the parser is built before torch loads

    p = sub.add_parser(
        "eval",
        help="loss, perplexity and generation metrics on a prepared split; optionally an LLM judge",
        description="Evaluate a model on a prepared split (fasttune data prepare, or a run's OUT/data).",
    )
    where = p.add_argument_group("model and data")
    where.add_argument(
        "--run", type=Path, metavar="OUT", help="a run's output folder: its model or adapter, data"
    )
    where.add_argument("--model", type=Path, help="a model folder, or a LoRA adapter folder naming its base")
    where.add_argument("--adapter", type=Path, help="a LoRA adapter folder for --model")
    where.add_argument("--data", type=Path, help="a prepared data folder (default with --run: OUT/data)")
    where.add_argument("--split", default="test", choices=SPLITS)
    where.add_argument(
        "--out", type=Path, help="the JSON report (default: OUT/eval.json with --run, else eval.json)"
    )
    add_device(where)
    add_dtype(where)
    where.add_argument(
        "--micro-batch-tokens",
        type=int,
        default=16384,
        help="tokens per row for the loss (default: %(default)s)",
    )
    gen = p.add_argument_group("generation")
    gen.add_argument(
        "--max-examples",
        type=int,
        metavar="N",
        help=f"generate for the first N examples (default: {EVAL_EXAMPLES}, as a run's own evaluation)",
    )
    gen.add_argument("--all", action="store_true", help="generate for every example of the split")
    add_sampling(gen)
    gen.add_argument("--batch-size", type=int, help="prompts per generation batch (default: up to 64)")
    cmp_ = p.add_argument_group("comparison")
    cmp_.add_argument(
        "--compare", type=Path, metavar="MODEL", help="a second model (or adapter) folder to compare"
    )
    cmp_.add_argument("--compare-adapter", type=Path, metavar="DIR", help="a LoRA adapter for --compare")
    j = p.add_argument_group("LLM judge (an OpenAI-compatible chat-completions endpoint)")
    j.add_argument("--judge-url", help="the endpoint's base URL, e.g. http://localhost:8000/v1")
    j.add_argument("--judge-model", help="the model name the endpoint serves")
    j.add_argument("--rubric", type=Path, help="1-5 rubric prompt: {instruction} {response} [{reference}]")
    j.add_argument(
        "--pairwise-prompt",
        type=Path,
        help="A/B prompt: {instruction} {response_a} {response_b} [{reference}]",
    )
    j.add_argument("--judge-api-key-env", metavar="VAR", help="environment variable holding the API key")
    j.add_argument("--judge-timeout", type=float, default=60.0, help="whole-request seconds (default: 60)")
    j.add_argument("--judge-retries", type=int, default=3, help="retries on timeouts and 5xx (default: 3)")
    j.add_argument("--judge-workers", type=int, default=4, help="requests in flight (default: 4)")
    j.add_argument("--judge-max-tokens", type=int, default=512, help="reply length limit (default: 512)")
    j.add_argument(
        "--judge-cache", type=Path, help="the answers, one JSON line each (default: <out>.judge.jsonl)"
    )


def _model_path(run: Path) -> Path:
    from fasttune.models.folders import run_output  # the rule generate and export use too

    found = run_output(run)
    if found is not None:
        return found
    raise FasttuneError(f"--run {run}: neither {run}/adapter nor {run}/model exists (has the run finished?)")


def _resolve(args) -> tuple[Path, Path, Path]:
    """(model, data, report path) from --run / --model / --data / --out."""
    if args.run is not None and not args.run.is_dir():
        raise FasttuneError(f"--run {args.run}: not a folder")
    model = args.model or (_model_path(args.run) if args.run is not None else None)
    data = args.data or (args.run / "data" if args.run is not None else None)
    if model is None or data is None:
        raise FasttuneError("eval needs --run OUT, or --model DIR and --data DIR")
    if not data.is_dir():
        raise FasttuneError(f"--data {data}: not a folder (prepare one with `fasttune data prepare`)")
    out = args.out or (args.run / ("eval.json" if args.split == "test" else f"eval-{args.split}.json")
                       if args.run is not None else Path("eval.json"))  # fmt: skip
    return model, data, out


def _judge_setup(args, out: Path):
    """(client, rubric, pairwise prompt, cache), all checked before any model is loaded; None without a
    judge URL."""
    from fasttune.eval import judge

    if args.judge_url is None:
        given = [f for f in ("judge_model", "rubric", "pairwise_prompt", "judge_api_key_env", "judge_cache")
                 if getattr(args, f) is not None]  # fmt: skip
        if given:
            raise FasttuneError(f"--{given[0].replace('_', '-')} needs --judge-url")
        return None
    if args.pairwise_prompt is not None and args.compare is None:
        raise FasttuneError("--pairwise-prompt needs --compare (the second model's outputs)")
    if not args.judge_model:
        raise FasttuneError("--judge-url needs --judge-model (the model name the endpoint serves)")
    if args.judge_workers < 1 or args.judge_retries < 0 or not args.judge_timeout > 0:
        raise FasttuneError("--judge-workers must be >= 1, --judge-retries >= 0 and --judge-timeout > 0")
    client = judge.JudgeClient(
        args.judge_url,
        args.judge_model,
        api_key_env=args.judge_api_key_env,
        timeout=args.judge_timeout,
        retries=args.judge_retries,
        max_tokens=args.judge_max_tokens,
    )
    rubric = judge.load_template(args.rubric, "rubric")
    pairwise = judge.load_template(args.pairwise_prompt, "pairwise") if args.compare else None
    cache = judge.JudgeCache(args.judge_cache or out.with_name(out.name + ".judge.jsonl"))
    return client, rubric, pairwise, cache


def _max_examples(args) -> int | None:
    """How many prompts to generate for: --max-examples N, every one with --all, else the run's default."""
    from fasttune.train.config import EVAL_EXAMPLES

    if args.all:
        return None
    return EVAL_EXAMPLES if args.max_examples is None else args.max_examples


def _evaluate(path: Path, adapter: Path | None, data: Path, args) -> dict:
    from fasttune.eval.evaluate import evaluate_run
    from fasttune.eval.generation import load_for_generation

    model, tokenizer = load_for_generation(path, adapter=adapter, dtype=args.dtype, device=args.device)
    try:
        report = evaluate_run(
            model,
            tokenizer,
            data,
            split=args.split,
            micro_batch_tokens=args.micro_batch_tokens,
            max_examples=_max_examples(args),
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
            batch_size=args.batch_size,
        )
    finally:
        del model
    report["model"] = str(path)
    report["adapter"] = None if adapter is None else str(adapter)
    return report


def _items(report: dict) -> list:
    from fasttune.eval import judge

    return [judge.Item(g["instruction"], g["generation"], g["reference"]) for g in report["generations"]]


def _print_summary(name: str, r: dict) -> None:
    if r["loss"] is not None:
        print(
            f"{name}: {r['split']} loss {r['loss']:.4f} (perplexity {r['perplexity']:.2f}) "
            f"over {r['examples']} examples"
        )
    m = r["metrics"]
    if m["examples"]:
        line = (
            f"  {m['examples']} generations: distinct-1 {m['distinct_1']:.3f}, "
            f"distinct-2 {m['distinct_2']:.3f}, "
            f"{m['mean_tokens']:.1f} tokens / {m['mean_words']:.1f} words on average, "
            f"memorised {m['memorised']:.1%}, empty {m['empty']}"
        )
        tc = m["template_coverage"]
        if tc is not None:
            line += f", template families covered {tc['covered']}/{len(tc['families'])}"
        print(line)
    j = r.get("judge")
    if j:
        mean = "-" if j["mean"] is None else f"{j['mean']:.2f}"
        low = "-" if j["share_1_2"] is None else f"{j['share_1_2']:.1%}"
        print(
            f"  judge: mean {mean} over {j['scored']} scored, 1s and 2s {low}; "
            f"{j['malformed']} malformed, {j['errors']} failed"
        )


def command(args) -> int:
    from fasttune.eval import judge
    from fasttune.eval.evaluate import write_report

    model, data, out = _resolve(args)
    if args.max_examples is not None and args.max_examples < 0:
        raise FasttuneError(f"--max-examples must be >= 0, got {args.max_examples}")
    if args.all and args.max_examples is not None:
        raise FasttuneError("--all and --max-examples N contradict each other: give one")
    setup = _judge_setup(args, out)  # a bad URL, key variable or prompt file fails before any loading
    report = _evaluate(model, args.adapter, data, args)
    if args.compare is not None:
        gc.collect()  # the first model is gone before the second loads
        report["compare"] = _evaluate(args.compare, args.compare_adapter, data, args)
    write_report(report, out)  # the generations are safe before the judge starts
    if setup is not None:
        client, rubric, pairwise, cache = setup
        workers = args.judge_workers
        report["judge_settings"] = {**client.describe(), "rubric": rubric.source, "cache": str(cache.path)}
        for r in [report] + ([report["compare"]] if "compare" in report else []):
            outcomes = judge.score_items(client, _items(r), rubric, cache, workers)
            r["judge"] = judge.summarize_scores(outcomes)
            for g, o in zip(r["generations"], outcomes, strict=True):
                g["judge"] = {k: o.get(k) for k in ("status", "value", "error")}
        if "compare" in report:
            report["judge_settings"]["pairwise_prompt"] = pairwise.source
            results = _pairwise(client, report, pairwise, cache, workers)
            report["pairwise"] = judge.summarize_pairs(results)
        write_report(report, out)
    _print_summary(str(model), report)
    if "compare" in report:
        _print_summary(str(args.compare), report["compare"])
    if "pairwise" in report:
        s = report["pairwise"]
        if s["complete"]:
            print(
                f"pairwise, {model} against {args.compare}: win {s['win']:.1%}, tie {s['tie']:.1%}, "
                f"loss {s['loss']:.1%} over {s['complete']} pairs (each asked in both orders; the orders "
                f"agree on {s['consistent']:.1%}); {s['incomplete']} incomplete"
            )
        else:
            print(f"pairwise: no complete pair ({s['incomplete']} incomplete)")
    print(f"report: {out}")
    return 0


def _pairwise(client, report: dict, template, cache, workers: int) -> list[dict]:
    """The first model against the second on the prompts both generated for (matched by record)."""
    from fasttune.eval import judge

    theirs = {g["index"]: g for g in report["compare"]["generations"]}
    mine = [g for g in report["generations"] if g["index"] in theirs]
    results = judge.compare_pairs(
        client,
        [g["instruction"] for g in mine],
        [g["generation"] for g in mine],
        [theirs[g["index"]]["generation"] for g in mine],
        template,
        cache,
        references=[g["reference"] for g in mine],
        workers=workers,
    )
    for g, r in zip(mine, results, strict=True):
        g["pairwise"] = r["result"]
    return results
