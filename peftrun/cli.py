"""The `peftrun` command: each subcommand parses, calls one function, and turns user mistakes into exit 2."""

from __future__ import annotations

import functools
import inspect
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer

from peftrun.errors import PeftrunError, mask_secrets, one_line

app = typer.Typer(
    name="peftrun",
    help="Parameter-efficient fine-tuning from a YAML recipe.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
STATE = {"debug": os.environ.get("PEFTRUN_DEBUG") == "1"}

TRUST_HELP = "run the Python code of a base model folder (never taken from an adapter folder)"
RecipeArg = Annotated[Path, typer.Argument(help="the recipe YAML file", show_default=False)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a recipe key: --set training.learning_rate=1e-4")]


def fail(message: str, code: int = 2, prefix: str = "error: ") -> None:
    """Print one line (credentials masked) on stderr and exit with `code`."""
    typer.echo(mask_secrets(f"{prefix}{one_line(message)}"), err=True)
    raise typer.Exit(code)


def _debug() -> bool:
    return STATE["debug"] or "--debug" in sys.argv


def user_errors(fn):
    """Known mistakes print one line and exit 2 (an interrupted run: 128 + signal); --debug adds the traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PeftrunError as exc:
            if _debug():
                traceback.print_exc()
            fail(exc.render(), exc.exit_code, prefix="error: " if exc.exit_code == 2 else "")
        except OSError as exc:
            # a file that cannot be read or written (permissions, a full disk): the environment, not a bug
            if _debug():
                traceback.print_exc()
            where = f"{exc.filename}: " if exc.filename else ""
            fail(f"{where}{exc.strerror or exc}", 2)
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="show full tracebacks")] = False,
) -> None:
    if debug:
        STATE["debug"] = True


@app.command()
@user_errors
def validate(
    recipe: RecipeArg,
    set_: SetOpt = None,
    here: Annotated[bool, typer.Option("--here", help="also check that this machine can run it (GPU, packages)")] = False,
) -> None:
    """Check a recipe (keys, types, values, method parameters) without loading any model; with --here, also
    this machine (a GPU recipe is valid on a CPU machine, and says what the machine lacks)."""
    from peftrun.recipe import load_recipe, machine_problems

    r = load_recipe(recipe, set_, machine=here)
    typer.echo(mask_secrets(f"{recipe}: ok ({r.method.name} on {r.model.name_or_path}, {r.model.task_type})"))
    for key, problem, hint in machine_problems(r, exact=False):  # imports no torch (--here asks torch)
        typer.echo(f"note: this machine cannot run it as it is: {'.'.join(key)}: {problem} ({hint}; `--here` checks)")


@app.command()
@user_errors
def params(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Print the trainable-parameter line, building the model on the meta device (no weights)."""
    from peftrun.adapted import wrap
    from peftrun.models import build_from_config
    from peftrun.recipe import load_recipe
    from peftrun.tasks import is_diffusion

    r = load_recipe(recipe, set_, machine=False)  # the meta device: no GPU needed
    if is_diffusion(r.model.task_type):  # a pipeline's components: the UNet (and text encoder) adapters
        from peftrun.diffusion.adapted import adapted_from_recipe

        typer.echo(adapted_from_recipe(r).trainable_report())
        return
    num_labels = r.model.num_labels or (len(r.data.label_names) if r.data.label_names else 2)
    if r.training.objective == "reward":
        num_labels = 1  # a reward model's head has one output (as training builds it)
    model = build_from_config(
        r.model.name_or_path, r.model.task_type, meta=True, num_labels=num_labels,
        overrides=r.model.config_overrides, trust_remote_code=r.model.trust_remote_code,
    )
    typer.echo(wrap(model, r.model.task_type, r.method.name, r.method_config).trainable_report())


@app.command()
@user_errors
def train(
    recipe: RecipeArg,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the newest complete checkpoint")] = False,
) -> None:
    """Train the recipe's adapter and save it in peft's format in output_dir."""
    from peftrun.recipe import load_recipe
    from peftrun.training.engines import end_process_group
    from peftrun.training.loop import train as run

    run(load_recipe(recipe, set_), resume=resume)
    end_process_group()


@app.command()
@user_errors
def merge(
    adapter: Annotated[Path, typer.Option("--adapter", help="the adapter folder")],
    output: Annotated[Path | None, typer.Option("--output", help="where the merged model goes")] = None,
    base: Annotated[str | None, typer.Option("--base", help="base model, if not the one the adapter names")] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="accept pickle (.bin) weights")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help=TRUST_HELP)] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="replace an --output folder that a peftrun merge or combine wrote")
    ] = False,
) -> None:
    """Fold an adapter into its base model and write a plain transformers model folder (for a DreamBooth
    adapter: a whole diffusers pipeline folder)."""
    from peftrun.diffusion.adapted import is_diffusion_adapter
    from peftrun.merge import merge as run

    if is_diffusion_adapter(adapter):
        from peftrun.diffusion.images import merge_to_pipeline
        from peftrun.io.outputs import check_output_folder

        if output is None:
            raise PeftrunError("give --output: the pipeline folder to write")
        check_output_folder(output, where=f"--output ({output})", inputs=[(adapter, "the adapter")], overwrite=overwrite)
        folder, diff = merge_to_pipeline(adapter, output, base=base)
        typer.echo(f"merged pipeline written to {folder} (max |merged - unmerged| noise prediction: {diff:.2e})")
        return

    folder, diff = run(
        adapter, output, base=base, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
        overwrite=overwrite,
    )
    typer.echo(f"merged model written to {folder} (max |merged - unmerged| on a probe input: {diff:.2e})")


@app.command()
@user_errors
def methods(
    verbose: Annotated[bool, typer.Option("--params", help="also list each method's parameters")] = True,
) -> None:
    """List every PEFT method: kind, whether it merges, a summary and its parameters with defaults."""
    from rich.console import Console
    from rich.table import Table

    from peftrun.methods import get_spec, method_names

    table = Table(title="peftrun methods", show_lines=True)
    for column in ("method", "kind", "merges", "summary", "parameters (defaults)"):
        table.add_column(column, overflow="fold")
    for name in method_names():
        m = get_spec(name)
        fields = [
            f"{k}={f.get_default(call_default_factory=True)!r}" if not f.is_required() else f"{k} (required)"
            for k, f in m.Config.model_fields.items()
            if k != "inference_mode"
        ]
        table.add_row(m.name, m.kind, "yes" if m.mergeable else "no", m.summary, ", ".join(fields) if verbose else "")
    Console(width=160).print(table)


@app.command()
@user_errors
def plot(
    metrics: Annotated[list[Path], typer.Argument(help="one or more metrics.jsonl files (runs overlaid)")],
    output: Annotated[Path, typer.Option("--output", help="the PNG to write")] = Path("loss.png"),
) -> None:
    """Draw train and eval loss against steps from metrics.jsonl files into a PNG, several runs overlaid."""
    from peftrun.training.plot import plot_losses

    typer.echo(f"wrote {plot_losses(metrics, output)}")


@app.command()
@user_errors
def schema(
    output: Annotated[Path | None, typer.Option("--output", help="write it to this file instead of stdout")] = None,
) -> None:
    """The recipe's JSON Schema (every method's parameters included), for editors that complete and check YAML."""
    from peftrun.schema import write_schema

    text = write_schema(output)
    typer.echo(f"wrote {output}" if output is not None else text.rstrip("\n"))


recipes_app = typer.Typer(help="The example recipes the package carries: list them, copy one out.", invoke_without_command=True)
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback()
@user_errors
def recipes_list(ctx: typer.Context) -> None:
    """List the bundled recipes (name and what it trains); `peftrun recipes copy NAME [DEST]` copies one."""
    if ctx.invoked_subcommand is not None:
        return
    from peftrun.bundled import recipes

    known = recipes()
    width = max(len(r.name) for r in known)
    for recipe in known:
        typer.echo(f"{recipe.name:<{width}}  {recipe.summary}")


@recipes_app.command("copy")
@user_errors
def recipes_copy(
    name: Annotated[str, typer.Argument(help="a name `peftrun recipes` lists (quickstart, offline/minilm_mrpc_lora)")],
    dest: Annotated[Path | None, typer.Argument(help="a file or folder (default: ./NAME.yaml)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing file")] = False,
) -> None:
    """Copy a bundled recipe out (and the small bundled dataset it reads, beside it)."""
    from peftrun.bundled import copy_recipe

    target, data = copy_recipe(name, dest, overwrite=overwrite)
    typer.echo(f"wrote {target}")
    for folder in data:
        typer.echo(f"wrote {folder} (the recipe reads it relative to {folder.parent.parent}: run from there)")


AdapterOpt = Annotated[
    Path | None, typer.Option("--adapter", help="a saved adapter folder; without it, the bare base model")
]
PickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="accept pickle (.bin) weights")]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help=TRUST_HELP)]


@app.command("eval")
@user_errors
def eval_(
    recipe: RecipeArg, adapter: AdapterOpt = None, set_: SetOpt = None, allow_pickle: PickleOpt = False,
) -> None:
    """Evaluate a saved adapter (or the bare base model) on the recipe's eval split."""
    import json

    from peftrun.evaluate import report_lines
    from peftrun.predict import run_eval
    from peftrun.recipe import load_recipe

    result = run_eval(load_recipe(recipe, set_), adapter, allow_pickle=allow_pickle)
    m = result.metrics
    line = f"eval_loss={m['eval_loss']:.6f}" + (f" eval_ppl={m['eval_ppl']:.6f}" if "eval_ppl" in m else "")
    typer.echo(line)
    for text in report_lines(result):
        typer.echo(text)
    typer.echo("metrics=" + json.dumps(m, sort_keys=True))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@user_errors
def launch(
    ctx: typer.Context,
    recipe: RecipeArg,
    set_: SetOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the accelerate config and command only")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the newest complete checkpoint")] = False,
) -> None:
    """Train on several processes or machines, or on DeepSpeed/FSDP: writes the accelerate config of the
    recipe's distributed section (or uses distributed.accelerate_config) and runs
    `accelerate launch -m peftrun train RECIPE`. Options after `--` go to accelerate launch. When a rank
    dies, the others are stopped and one line names it and the command that continues the run."""
    from peftrun.recipe import load_recipe
    from peftrun.training.launch import launch as run

    r = load_recipe(recipe, set_)
    code = run(r, str(recipe), list(set_ or []), list(ctx.args), dry_run=dry_run, resume=resume)
    if code:
        raise typer.Exit(code)


# ------------------------------------------------------------------ using adapters: generate, chat, combine

AdaptersOpt = Annotated[
    list[str] | None,
    typer.Option("--adapter", help="an adapter folder, or name=DIR; repeat to load several on one base"),
]
UseOpt = Annotated[str | None, typer.Option("--use", help="the adapter that answers (default: the first given)")]
NoAdapterOpt = Annotated[bool, typer.Option("--no-adapter", help="answer with the base model alone")]
BaseOpt = Annotated[str | None, typer.Option("--base", help="base model, if not the one the adapters name")]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="float32, bfloat16 or float16")]
DeviceMapOpt = Annotated[
    str | None, typer.Option("--device-map", help="Accelerate's big-model inference: auto, balanced, sequential")
]
OffloadOpt = Annotated[str | None, typer.Option("--offload-folder", help="where --device-map offloads to disk")]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", help="tokens to generate at most")]
SampleOpt = Annotated[bool, typer.Option("--do-sample/--greedy", help="sample (temperature, top-p, top-k) or greedy")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", help="sampling temperature")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="nucleus sampling: keep this much probability mass")]
TopKOpt = Annotated[int, typer.Option("--top-k", help="sample among the k likeliest tokens (0: all)")]
BeamsOpt = Annotated[int, typer.Option("--num-beams", help="beam search width (1: no beam search)")]
RepetitionOpt = Annotated[float, typer.Option("--repetition-penalty", help="above 1 discourages repeats")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="seed for sampling")]
TemplateOpt = Annotated[
    str, typer.Option("--template", help="auto (as the adapter trained, else the chat template), chat, alpaca, raw")
]
SystemOpt = Annotated[str | None, typer.Option("--system", help="a system message for the chat template")]

# Flags generate and chat share, each group in --help order: (name, flag, default).
DECODING = [  # gathered into one GenerationOptions; --max-new-tokens takes its default from the command
    ("max_new_tokens", MaxNewOpt, None),
    ("do_sample", SampleOpt, False),
    ("temperature", TemperatureOpt, 1.0),
    ("top_p", TopPOpt, 1.0),
    ("top_k", TopKOpt, 50),
    ("num_beams", BeamsOpt, 1),
    ("repetition_penalty", RepetitionOpt, 1.0),
    ("seed", SeedOpt, None),
]
LOADING = [  # how the base model loads: gathered into a dict for _load_for_generation
    ("base", BaseOpt, None),
    ("dtype", DtypeOpt, None),
    ("device_map", DeviceMapOpt, None),
    ("offload_folder", OffloadOpt, None),
    ("allow_pickle", PickleOpt, False),
    ("trust_remote_code", TrustOpt, False),
]


def _generation_options(**values):
    from peftrun.generation import GenerationOptions

    return GenerationOptions(**values)


def flag_group(parameter: str, flags: list, gather=dict, **defaults):
    """Put a group of shared flags where a command declares `parameter` (so --help lists them there) and call
    the command with their values gathered into one object, `gather(**values)`, before its body runs.
    `defaults` gives a flag this command's own default."""

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)  # Typer reads real annotations, not strings
        defaults_here = {name: default for name, _, default in flags} | defaults
        group = [
            inspect.Parameter(
                name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=flag, default=defaults_here[name]
            )
            for name, flag, _ in flags
        ]
        parameters = []
        for each in signature.parameters.values():
            parameters += group if each.name == parameter else [each]

        @functools.wraps(command)
        def with_group(**kwargs):
            kwargs[parameter] = gather(**{name: kwargs.pop(name) for name, _, _ in flags})
            return command(**kwargs)

        with_group.__signature__ = signature.replace(parameters=parameters)
        with_group.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": None}
        return with_group

    return decorate


def _load_for_generation(
    adapter, use, no_adapter, base, dtype, device_map, offload_folder, allow_pickle, trust_remote_code
):
    from peftrun.api import load

    if not adapter and not base:
        raise PeftrunError("give --adapter DIR (repeat for several: --adapter a=DIR --adapter b=DIR) or --base")
    if use and no_adapter:
        raise PeftrunError("--use and --no-adapter exclude each other")
    return load(
        base, adapter, use=use, dtype=dtype, device_map=device_map, offload_folder=offload_folder,
        allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
    )


def _wants_image(adapters: list[str] | None, loading: dict) -> bool:
    """A TEXT_TO_IMAGE adapter (unet/ inside) or a diffusers pipeline as --base."""
    from peftrun.api import parse_adapter_spec
    from peftrun.diffusion.adapted import is_diffusion_adapter

    if any(is_diffusion_adapter(parse_adapter_spec(a, with_weight=True)[1]) for a in adapters or []):
        return True
    return bool(loading.get("base")) and (Path(loading["base"]) / "model_index.json").is_file()


@app.command()
@user_errors
def predict(
    recipe: RecipeArg,
    input_file: Annotated[Path, typer.Option("--input", help="rows to predict (csv, tsv, json, jsonl, parquet; token classification also CoNLL)")],
    output: Annotated[Path, typer.Option("--output", help="where predictions go: .csv, .tsv or .jsonl (token classification also .conll)")],
    adapter: AdapterOpt = None,
    set_: SetOpt = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="rows per forward")] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option("--max-new-tokens", min=1, help="answer length for generating models")
    ] = None,
    allow_pickle: PickleOpt = False,
) -> None:
    """Write one prediction per input row (its columns plus `prediction`) for an unlabelled split."""
    from peftrun.predict import run_predict
    from peftrun.recipe import load_recipe

    r = load_recipe(recipe, set_)
    if max_new_tokens:
        r.data.target_max_length = max_new_tokens
    n = run_predict(r, adapter, input_file, output, allow_pickle=allow_pickle, batch_size=batch_size)
    typer.echo(f"wrote {n} predictions to {output}")


@app.command()
@user_errors
@flag_group("options", DECODING, gather=_generation_options, max_new_tokens=128)
@flag_group("loading", LOADING)
def generate(
    prompt: Annotated[str | None, typer.Argument(help="the prompt (or --input FILE, or piped stdin)")] = None,
    adapter: AdaptersOpt = None,
    use: UseOpt = None,
    no_adapter: NoAdapterOpt = False,
    input_: Annotated[
        Path | None, typer.Option("--input", help=".txt (a prompt a line) or .json/.jsonl rows: prompt, adapter")
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", help="also write the --input rows with answers here")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="rows per generate call with --input", min=1)] = 8,
    options=None,  # the DECODING flags, as one GenerationOptions (see flag_group)
    template: TemplateOpt = "auto",
    system: SystemOpt = None,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="print tokens as they come")] = True,
    steps: Annotated[int, typer.Option("--steps", min=1, help="images: denoising steps")] = 50,
    guidance_scale: Annotated[float, typer.Option("--guidance-scale", help="images: classifier-free guidance")] = 7.5,
    size: Annotated[str | None, typer.Option("--size", help="images: N or HxW (default: the pipeline's)")] = None,
    loading=None,  # the LOADING flags, as a dict (see flag_group)
) -> None:
    """Generate with an adapter (or several: --adapter a=DIR --adapter b=DIR --use a) on its base model.
    With a DreamBooth (TEXT_TO_IMAGE) adapter: an image of PROMPT to --output (PNG); several adapters, or
    DIR:weight, act together with their weights."""
    from peftrun.generation import DEFAULT, answer, answer_rows, read_rows

    if _wants_image(adapter, loading):
        from peftrun.diffusion.images import image_command

        if not prompt or output is None:
            raise PeftrunError("an image needs a PROMPT and --output FILE.png")
        path = image_command(
            prompt, list(adapter or []), output, base=loading["base"], use=use, no_adapter=no_adapter,
            steps=steps, guidance_scale=guidance_scale, seed=options.seed, size=size, dtype=loading["dtype"],
            allow_pickle=loading["allow_pickle"],
        )
        typer.echo(f"image written to {path}")
        return

    if prompt is not None and input_ is not None:
        raise PeftrunError("give a PROMPT or --input FILE, not both")
    if prompt is None and input_ is None:
        if sys.stdin.isatty():
            raise PeftrunError("give a PROMPT, --input FILE, or pipe the prompt in")
        prompt = sys.stdin.read().strip()
    if output is not None:  # a wrong output fails before the model loads
        from peftrun.io.outputs import check_output_file

        output = check_output_file(output, where=f"--output ({output})", inputs=[(input_, "the --input file")])
    rows = read_rows(input_) if input_ is not None else None  # a wrong file fails before the model loads
    model = _load_for_generation(adapter, use, no_adapter, **loading)
    default = None if no_adapter else DEFAULT
    if rows is not None:
        answer_rows(model, rows, options, output, default=default, style=template, system=system, batch_size=batch_size)
    else:
        answer(model, prompt, options, adapter=default, style=template, system=system, stream=stream)


@app.command()
@user_errors
def preview(
    recipe: RecipeArg,
    set_: SetOpt = None,
    n: Annotated[int, typer.Option("-n", "--examples", min=0, help="how many train examples to print")] = 3,
) -> None:
    """Print the first training examples as the model sees them, trained tokens highlighted, and the counts of
    examples, tokens, trained tokens and truncated rows; loads the tokenizer and the data, never the weights."""
    from rich.console import Console

    from peftrun.preview import preview as run
    from peftrun.recipe import load_recipe

    run(load_recipe(recipe, set_, machine=False), n, Console(soft_wrap=True))


@app.command()
@user_errors
def estimate(
    recipe: RecipeArg,
    set_: SetOpt = None,
    gpu_gb: Annotated[float | None, typer.Option("--gpu-gb", help="device memory in GB (10^9 bytes): fits or OOM")] = None,
) -> None:
    """Memory for full fine-tuning, the recipe's method, and the method with ZeRO-3 CPU offload,
    from the architecture on the meta device (nothing is downloaded or allocated)."""
    from peftrun.estimate import estimate as run
    from peftrun.estimate import render
    from peftrun.recipe import load_recipe

    typer.echo(render(run(load_recipe(recipe, set_, machine=False), device_gb=gpu_gb)))


@app.command()
@user_errors
@flag_group("options", DECODING, gather=_generation_options, max_new_tokens=256)
@flag_group("loading", LOADING)
def chat(
    adapter: AdaptersOpt = None,
    use: UseOpt = None,
    no_adapter: NoAdapterOpt = False,
    options=None,  # the DECODING flags, as one GenerationOptions (see flag_group)
    template: TemplateOpt = "auto",
    system: SystemOpt = None,
    loading=None,  # the LOADING flags, as a dict (see flag_group)
) -> None:
    """Talk with an adapted model, a line at a time (/use NAME, /base, /reset, /exit; EOF ends)."""
    from peftrun.generation import chat_loop

    model = _load_for_generation(adapter, use, no_adapter, **loading)
    adapter_name = None if no_adapter else model.active_adapter
    chat_loop(model, model.tokenizer, options, adapter=adapter_name, style=template, system=system)


@app.command()
@user_errors
def combine(
    adapter: Annotated[
        list[str], typer.Option("--adapter", help="a LoRA adapter and its weight: DIR:0.7 or name=DIR:0.7 (repeat)")
    ],
    output: Annotated[Path, typer.Option("--output", help="the new adapter folder")],
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="peft's names, meaning what they mean in peft's add_weighted_adapter: linear, cat, svd, ties, "
            "ties_svd, dare_linear, dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, "
            "magnitude_prune_svd; peftrun's own: linear_factors, ties_delta, dare_linear_delta, dare_ties_delta",
        ),
    ] = "cat",
    rank: Annotated[
        int | None, typer.Option("--rank", help="rank of the result for svd, *_svd (peft's svd_rank), *_delta")
    ] = None,
    density: Annotated[float, typer.Option("--density", help="share of entries ties/dare/magnitude_prune keep")] = 0.5,
    seed: Annotated[int, typer.Option("--seed", help="seed of DARE's random drop")] = 0,
    majority_sign: Annotated[
        str, typer.Option("--majority-sign", help="ties/dare_ties sign election: total or frequency")
    ] = "total",
    svd_clamp: Annotated[
        float | None, typer.Option("--svd-clamp", help="svd/*_svd: clamp the factors at this quantile")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="replace an --output folder that a peftrun merge or combine wrote")
    ] = False,
) -> None:
    """Combine LoRA adapters with weights into a new adapter folder (peft format)."""
    from peftrun.api import parse_adapter_spec
    from peftrun.combination import combine as run

    pairs = []
    for spec in adapter:
        _, folder, weight = parse_adapter_spec(spec, with_weight=True)
        pairs.append((folder, 1.0 if weight is None else weight))
    result = run(
        pairs,
        output,
        method=method,
        rank=rank,
        density=density,
        seed=seed,
        majority_sign_method=majority_sign,
        svd_clamp=svd_clamp,
        overwrite=overwrite,
    )
    ranks = sorted(set(result.ranks.values()))
    typer.echo(
        f"combined {len(pairs)} adapters with {method} into {result.folder}: {len(result.ranks)} modules, "
        f"rank {'/'.join(map(str, ranks))}; max relative distance from the weighted sum of deltas "
        f"{result.max_relative_distance:.3g}"
    )


def _show_usage_error(exc) -> None:
    """Print a click usage error as typer itself would (a rich panel where rich is present)."""
    try:
        from typer.core import HAS_RICH
        from typer.rich_utils import rich_format_error
    except ImportError:
        HAS_RICH = False
    if HAS_RICH:
        rich_format_error(exc)
    else:
        exc.show()


def main() -> None:
    try:
        from typer._click import ClickException  # typer vendors click since 0.25
    except ImportError:  # an older typer on plain click
        from click import ClickException

    try:
        # click's own handling of usage errors would print the command line back unmasked: done here instead
        code = app(standalone_mode=False)
    except ClickException as exc:  # a usage error: unknown option or command, missing argument
        exc.message = mask_secrets(exc.message)  # before any layout could wrap a token over two lines
        _show_usage_error(exc)
        sys.exit(exc.exit_code)
    except typer.Abort:  # Ctrl-C or end of input at a prompt
        sys.stderr.write("Aborted!\n")
        sys.exit(1)
    except SystemExit:
        raise
    except Exception:
        if _debug():
            raise
        typer.echo("error: peftrun hit an unexpected problem (a bug); run again with --debug for the traceback:", err=True)
        typer.echo("  " + mask_secrets(traceback.format_exc().strip().splitlines()[-1]), err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
