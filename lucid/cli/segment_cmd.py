"""`lucid segment`, `lucid testbed train-sam`, `lucid testbed eval-sam` and `lucid sam-to-hf`.

Registered on the app by `lucid.cli` (`register`); the same error contract applies (`LucidGroup`): every
input is checked before torch is imported, a bad one is one `lucid: error: ...` line and exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from grounding.sam import SAM_HELP  # the spec registry's help (light: no torch)
from lucid.cli.common import (
    HEATMAP_SUFFIXES,
    checked_output,
    deliver,
    fail_after_result,
    load_model,
    quiet,
    stdout_to_stderr,
)
from lucid.errors import InputError, OutputError


def parse_point(text: str) -> tuple[float, float, int]:
    """'X,Y' or 'X,Y:1' (on the object) / 'X,Y:0' (not on it) -> (x, y, label)."""
    body, _, label = text.partition(":")
    parts = body.split(",")
    try:
        if len(parts) != 2 or label not in ("", "0", "1"):
            raise ValueError
        return float(parts[0]), float(parts[1]), int(label or 1)
    except ValueError:
        raise InputError(f"--point must be X,Y or X,Y:0|1 (pixels; 1 = on the object), got {text!r}") from None


def parse_box(text: str) -> tuple[float, float, float, float]:
    parts = text.split(",")
    try:
        if len(parts) != 4:
            raise ValueError
        x0, y0, x1, y1 = (float(v) for v in parts)
    except ValueError:
        raise InputError(f"--box must be X0,Y0,X1,Y1 (pixels, x1/y1 exclusive), got {text!r}") from None
    return x0, y0, x1, y1


def register(app: typer.Typer, testbed_app: typer.Typer) -> None:
    @app.command()
    def segment(
        image: Annotated[Path, typer.Argument(help="Image file (PNG, JPEG, GIF, BMP, TIFF, WebP, PPM).")],
        query: Annotated[
            str | None, typer.Argument(help="What to segment, e.g. 'the red circle' (uses the VLM).")
        ] = None,
        point: Annotated[list[str] | None, typer.Option("--point", help="X,Y[:0|1] pixel prompt (repeatable).")] = None,
        box: Annotated[list[str] | None, typer.Option("--box", help="X0,Y0,X1,Y1 box prompt (repeatable).")] = None,
        model: Annotated[
            str, typer.Option(help="'testbed' or a local llava-hf checkpoint (text queries).")
        ] = "testbed",
        sam: Annotated[str, typer.Option(help=SAM_HELP)] = "testbed",
        heads: Annotated[str, typer.Option(help="Localization heads: 'auto' or L:H,L:H (text queries).")] = "auto",
        prompt: Annotated[str, typer.Option(help="What attention gives SAM: point, box or point_box.")] = "point",
        method: Annotated[
            str | None,
            typer.Option(
                help="How a text QUERY becomes SAM prompts: 'heads' (localization heads' peak, the default), "
                "READ's similarity-as-points 'read[:k=v,...]' (e.g. read:token=last,layer=3), or VL-SAM's "
                "attention flow 'vl-sam[:k=v,...]' (the default with --all; docs/grounding.md)."
            ),
        ] = None,
        all_objects: Annotated[
            bool,
            typer.Option("--all", help="Open-ended: segment every object the VLM names (VL-SAM; no QUERY)."),
        ] = False,
        out: Annotated[Path | None, typer.Option(help="Write the masks (and map) over the image as PNG.")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object instead of lines.")] = False,
    ) -> None:
        """Segment IMAGE with SAM from explicit --point/--box prompts, from a text QUERY located by the
        VLM's attention, or every object the VLM names (--all, VL-SAM). Coordinates are ORIGINAL image pixels."""
        import time

        from grounding.sam import PromptError, SamPrompt, check_sam_spec
        from grounding.segment import ATTENTION_PROMPTS
        from vlm.contract import atomic_output, check_question
        from vlm.images import load_image

        points = [parse_point(p) for p in point or []]
        boxes = [parse_box(b) for b in box or []]
        if all_objects:
            if query is not None or points or boxes:
                raise InputError("--all segments every object the model names: give no QUERY, --point or --box")
            method = "vl-sam" if method is None else method
            if method.partition(":")[0].strip() != "vl-sam":
                raise InputError(f"--all needs --method vl-sam[:k=v,...], got {method!r}")
        elif query is not None:
            check_question(query)
            if points or boxes:
                raise InputError("give either a text QUERY or --point/--box prompts, not both")
        elif not points and not boxes:
            raise InputError("nothing to segment: give a text QUERY, --all, or --point X,Y and/or --box X0,Y0,X1,Y1")
        method = "heads" if method is None else method
        if prompt not in ATTENTION_PROMPTS:
            raise InputError(f"--prompt must be one of {', '.join(ATTENTION_PROMPTS)}, got {prompt!r}")
        read = vlsam = None
        if method.partition(":")[0].strip() == "vl-sam":
            from grounding.vlsam import parse_vlsam

            try:
                vlsam = parse_vlsam(method)
            except ValueError as e:
                raise InputError(f"--method {e}") from None
            if query is None and not all_objects:
                raise InputError("--method vl-sam needs a text QUERY or --all")
            if heads != "auto" or prompt != "point":
                raise InputError("--heads and --prompt belong to --method heads, not vl-sam")
        elif method != "heads":
            from grounding.read import parse_read

            if method.partition(":")[0].strip() != "read":
                raise InputError(f"--method must be 'heads' or 'read[:k=v,...]' or 'vl-sam[:k=v,...]', got {method!r}")
            try:
                read = parse_read(method)
            except ValueError as e:
                raise InputError(f"--method {e}") from None
            if query is None:
                raise InputError("--method read needs a text QUERY")
            if heads != "auto" or prompt != "point":
                raise InputError("--heads and --prompt belong to --method heads, not read")
        explicit = None
        if heads != "auto":
            from grounding.heads import parse_heads

            try:
                explicit = parse_heads(heads)
            except ValueError as e:
                raise InputError(f"--heads: {e}") from e
        path = checked_output(out, HEATMAP_SUFFIXES, "overlay")
        check_sam_spec(sam)
        if query is not None or all_objects:
            from vlm.checkpoint import inspect_checkpoint

            info = inspect_checkpoint(model)
            if read is not None:  # the layer against config.json, before any model loads
                from grounding.read import check_layer

                text = json.loads((info.path / "config.json").read_text()).get("text_config") or {}
                if isinstance(text.get("num_hidden_layers"), int):
                    try:
                        check_layer(read.layer, text["num_hidden_layers"])
                    except ValueError as e:
                        raise InputError(f"--method read: {e}") from None
        pil = load_image(image)
        w, h = pil.size
        if len(boxes) > 1 and points:
            raise InputError("give points with at most one box (each box is its own object)")
        try:  # every prompt is checked against the image before any model loads
            for b in boxes or [None]:
                if points or b is not None:
                    SamPrompt(tuple((x, y) for x, y, _ in points), tuple(lab for *_, lab in points), b).check(w, h)
        except PromptError as e:
            raise InputError(str(e)) from None
        quiet()
        from grounding.sam import load_segmenter
        from grounding.segment import segment_prompts, segment_query

        t0 = time.perf_counter()
        with stdout_to_stderr():
            segmenter = load_segmenter(sam)
            timings = {"load_sam_s": time.perf_counter() - t0}
            if vlsam is not None:
                from grounding.vlsam import segment_vlsam

                t1 = time.perf_counter()
                vlm = load_model(model)
                timings["load_model_s"] = time.perf_counter() - t1
                try:
                    found, more = segment_vlsam(vlm, segmenter, pil, query, vlsam)
                except ValueError as e:  # the referring answer does not hold the query's words
                    raise InputError(f"--method vl-sam: {e}") from None
                timings.update(more)
                objects = [o.segmented() for o in found]
            elif query is None:
                t1 = time.perf_counter()
                objects = segment_prompts(segmenter, pil, points, boxes)
                timings["sam_s"] = time.perf_counter() - t1
                timings.update({f"sam_{k}_s": v for k, v in segmenter.timings.items()})
            elif read is not None:
                from grounding.read import segment_read

                t1 = time.perf_counter()
                vlm = load_model(model)
                timings["load_model_s"] = time.perf_counter() - t1
                try:
                    objects, more = segment_read(vlm, segmenter, pil, [query], read)
                except ValueError as e:  # a layer outside the model, no seg token in the tokenizer or answer
                    raise InputError(f"--method read: {e}") from None
                timings.update(more)
            else:
                from grounding import load_or_discover

                t1 = time.perf_counter()
                vlm = load_model(model)
                try:
                    selection = load_or_discover(vlm) if explicit is None else load_or_discover(vlm, heads=explicit)
                except ValueError as e:
                    raise InputError(f"--heads: {e}") from e
                timings["load_model_s"] = time.perf_counter() - t1
                objects, more = segment_query(vlm, segmenter, pil, [query], selection, how=prompt)
                timings.update(more)
        payload = {
            "objects": [o.to_json() for o in found] if vlsam is not None else [o.to_json() for o in objects],
            "image_size": [w, h],
            "sam": segmenter.source,
            "timings": {k: round(v, 4) for k, v in timings.items()},
        }
        if vlsam is not None:
            from dataclasses import asdict

            answers = {(o.source.scale, o.source.question): o.source.answer for o in found}
            payload["vl_sam"] = {
                "params": asdict(vlsam),
                "mode": "all" if all_objects else "query",
                "answers": [{"scale": k[0], "question": k[1], "answer": v} for k, v in answers.items()],
            }
        elif read is not None:
            from dataclasses import asdict

            payload["read"] = {"params": asdict(read), **objects[0].location.to_json()}
        elif query is not None:
            payload["heads"] = [[int(a), int(b)] for a, b in objects[0].location.heads]
        if as_json:
            typer.echo(json.dumps(payload))
        else:
            if vlsam is not None and not objects:
                typer.echo("no object found")
            for i, o in enumerate(objects):
                b = ", ".join(f"{v:.0f}" for v in o.box)
                where = f", {found[i].scale}" if vlsam is not None else ""
                typer.echo(f"{o.label}: box [{b}] score {o.score:.2f} ({int(o.mask.sum())} px, from {o.source}{where})")
        if path is not None:
            from lucid.overlay import save_segment_overlay

            try:
                with stdout_to_stderr(), atomic_output(path) as tmp:
                    save_segment_overlay(tmp, pil, objects)
            except OutputError as e:
                fail_after_result(e)

    @testbed_app.command("train-sam")
    def train_sam_cmd(
        seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
        out: Annotated[Path, typer.Option(help="Directory to write (resumes a run found there).")] = Path("tiny-sam"),
        steps: Annotated[int, typer.Option(min=1, help="Optimizer steps (16 scenes x 4 prompts each).")] = 2400,
        threads: Annotated[int, typer.Option(min=1, max=64, help="torch threads.")] = 1,
    ) -> None:
        """Train the embedded tiny SAM from scratch on shapes-world scenes (resumable; ~55 min on 1 core)."""
        from dataclasses import replace

        from vlm.contract import check_seed

        check_seed(seed, "--seed")
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out} exists and is not a directory")
        from testbed.studies.sam_train import SamRecipe, train_sam

        with stdout_to_stderr():
            summary = train_sam(replace(SamRecipe(), seed=seed, steps=steps, threads=threads), out)
        typer.echo(json.dumps({"out": str(out), **summary}))

    @testbed_app.command("eval-sam")
    def eval_sam_cmd(
        sam: Annotated[str, typer.Option(help=SAM_HELP)] = "testbed",
        n: Annotated[int, typer.Option(min=1, help="Held-out scenes.")] = 300,
        foreign: Annotated[int, typer.Option(min=0, help="Scenes drawn by testbed/world/foreign.py.")] = 100,
        seed: Annotated[int, typer.Option(help="Seed of the held-out scenes.")] = 2024,
        attention: Annotated[
            bool, typer.Option(help="Also score text query -> attention -> SAM (loads the VLM).")
        ] = False,
        read: Annotated[
            list[str] | None,
            typer.Option("--read", help="Also score READ's SasP with this spec (repeatable; loads the VLM)."),
        ] = None,
        vl_sam: Annotated[
            list[str] | None,
            typer.Option(
                "--vl-sam",
                help="Also score VL-SAM on the referring queries with this spec (repeatable; loads the VLM).",
            ),
        ] = None,
        vl_sam_all: Annotated[
            list[str] | None,
            typer.Option(
                "--vl-sam-all",
                help="Also score open-ended VL-SAM (AP@0.5, recall, absent names) with this spec (repeatable).",
            ),
        ] = None,
        vl_sam_scenes: Annotated[
            int, typer.Option(min=1, help="Held-out scenes of the open-ended VL-SAM score (--vl-sam-all).")
        ] = 200,
        model: Annotated[str, typer.Option(help="The VLM for --attention / --read / --vl-sam.")] = "testbed",
        threads: Annotated[int, typer.Option(min=1, max=64, help="torch threads.")] = 2,
        out: Annotated[
            Path | None, typer.Option(help="Also write the metrics JSON here (.json; - = stdout only).")
        ] = None,
    ) -> None:
        """SAM quality on fresh held-out scenes: mIoU per prompt kind (point, box, points, point+box,
        refinement with the fed-back mask), evaluation distribution and foreign scenes; optionally the
        attention paths (--attention, --read, --vl-sam referring, --vl-sam-all open-ended)."""
        from grounding.sam import check_sam_spec
        from vlm.contract import check_seed

        check_seed(seed, "--seed")
        path = checked_output(out, (".json",), "metrics", stdout_ok=True)
        check_sam_spec(sam)
        if read:
            from grounding.read import parse_read

            for spec in read:
                try:
                    if spec.partition(":")[0].strip() != "read":
                        raise ValueError(f"must be 'read[:k=v,...]', got {spec!r}")
                    parse_read(spec)
                except ValueError as e:
                    raise InputError(f"--read {e}") from None
        if vl_sam or vl_sam_all:
            from grounding.vlsam import parse_vlsam

            for flag, spec in [("--vl-sam", v) for v in vl_sam or []] + [("--vl-sam-all", v) for v in vl_sam_all or []]:
                try:
                    parse_vlsam(spec)
                except ValueError as e:
                    raise InputError(f"{flag} {e}") from None
        if attention or read or vl_sam or vl_sam_all:
            from vlm.checkpoint import inspect_checkpoint

            inspect_checkpoint(model)
        quiet()
        import torch

        from grounding.sam import load_segmenter
        from testbed.studies.sam_eval import attention_to_sam, prompt_quality

        torch.set_num_threads(threads)
        with stdout_to_stderr():
            segmenter = load_segmenter(sam)
            metrics = {"sam": segmenter.source, "prompts": prompt_quality(segmenter, seed, n, foreign)}
            if attention:
                from grounding import load_or_discover

                vlm = load_model(model)
                metrics["attention"] = attention_to_sam(vlm, segmenter, load_or_discover(vlm))
                metrics["model"] = vlm.name
            if read:
                from testbed.studies.sam_eval import read_to_sam

                vlm = vlm if attention else load_model(model)
                metrics["read"] = read_to_sam(vlm, segmenter, read)
                metrics["model"] = vlm.name
            if vl_sam or vl_sam_all:
                from testbed.studies.sam_eval import vlsam_open_ended, vlsam_to_sam

                vlm = vlm if (attention or read) else load_model(model)
                if vl_sam:
                    metrics["vl_sam"] = vlsam_to_sam(vlm, segmenter, vl_sam)
                if vl_sam_all:
                    metrics["vl_sam_all"] = vlsam_open_ended(vlm, segmenter, vl_sam_all, n_scenes=vl_sam_scenes)
                metrics["model"] = vlm.name
        deliver(json.dumps(metrics, indent=1), path)

    @app.command("sam-to-hf")
    def sam_to_hf(
        src: Annotated[str, typer.Argument(help="An official-architecture SAM: testbed, a DIR, or vit_b:PATH.")],
        out: Annotated[Path, typer.Argument(help="Directory to write (SamModel.from_pretrained loads it).")],
    ) -> None:
        """Convert official-architecture SAM weights into a transformers SamModel directory."""
        from grounding.sam import OfficialSam, check_sam_spec, parse_sam_spec
        from vlm.contract import check_output_dir

        check_sam_spec(src)
        check_output_dir(out, "SAM")
        backend, arg = parse_sam_spec(src)
        from grounding.sam import load_segmenter
        from grounding.sam_convert import to_hf
        from grounding.sam_model import SamArchitecture

        seg = load_segmenter(src)
        if not isinstance(seg, OfficialSam):
            raise InputError(f"{src} is already a transformers SAM")
        if backend.sa_model is not None:
            sizes = {
                "vit_b": (768, 12, 12, (2, 5, 8, 11)),
                "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
                "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
            }[backend.sa_model]
            arch = SamArchitecture(
                img_size=1024,
                patch_size=16,
                encoder_dim=sizes[0],
                encoder_depth=sizes[1],
                encoder_heads=sizes[2],
                window_size=14,
                global_attn_indexes=sizes[3],
                use_rel_pos=True,
                prompt_dim=256,
                decoder_depth=2,
                decoder_heads=8,
                decoder_mlp=2048,
            )
        else:
            import json as _json

            from grounding.sam import TESTBED_SAM

            d = TESTBED_SAM if backend.name == "testbed" else Path(arg)
            arch = SamArchitecture.from_json(_json.loads((d / "sam_config.json").read_text())["architecture"])
        to_hf(seg.model.state_dict(), arch, out)
        typer.echo(f"wrote {out}")
