"""The site's figures and stage tables, drawn by code when the site is built.

Each figure is an SVG that matplotlib writes from the framework-free spec (`conformance.specs`),
so a change to an architecture redraws it: `<!-- xf:figure NAME -->` on a page shows
figures/NAME.svg, and `<!-- xf:stages ARCH SIZE -->` a table of every stage's output shape
and parameters. No framework is imported.
"""

from __future__ import annotations

import io
from collections.abc import Callable

from ..specs import channel_plan, count_params, get_spec, is_running_stat, parameter_table, stage_shapes

CAPTIONS = {
    "resnet_vs_densenet": "ResNet adds a block's output to its input; DenseNet concatenates the two.",
    "dense_block": "A dense block of four conv blocks: each one reads the concatenation of everything before it.",
    "channel_growth": "Channels through the d2l net (computed from its spec): each conv block adds the growth "
    "rate, each transition halves the width and the height.",
}
BLUE, ORANGE, GREY = "#3f51b5", "#ff9800", "#9e9e9e"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"  # text stays text: smaller files, searchable, selectable
    plt.rcParams["svg.hashsalt"] = "densenet-xf"  # the same ids in every build
    return plt


def svg(figure) -> str:
    """The figure as SVG text, without the date matplotlib would write (the same spec, the same file)."""
    out = io.StringIO()
    figure.savefig(out, format="svg", bbox_inches="tight", metadata={"Date": None})
    pyplot().close(figure)
    return out.getvalue()


def box(ax, x, y, text, color=BLUE, width=1.4, height=0.6):
    ax.add_patch(
        pyplot().Rectangle((x - width / 2, y - height / 2), width, height, facecolor=color, alpha=0.2, edgecolor=color)
    )
    ax.text(x, y, text, ha="center", va="center", fontsize=10)


def arrow(ax, start, end, rad=0.0, color="black"):
    from matplotlib.patches import FancyArrowPatch

    ax.add_patch(
        FancyArrowPatch(
            start, end, arrowstyle="-|>", mutation_scale=12, color=color, connectionstyle=f"arc3,rad={rad}", lw=1.2
        )
    )


def resnet_vs_densenet() -> str:
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(9, 2.6))
    for ax, title, merge, out in (
        (axes[0], "ResNet: x + f(x)", "+", "x + f(x)"),
        (axes[1], "DenseNet: [x, f(x)]", "[ , ]", "[x, f(x)]"),
    ):
        box(ax, 0, 0, "x", GREY, width=0.8)
        box(ax, 2, 0.9, "f", BLUE, width=0.9)
        box(ax, 4, 0, merge, ORANGE, width=0.9)
        box(ax, 6, 0, out, GREY, width=1.5)
        arrow(ax, (0.4, 0.15), (1.55, 0.85))
        arrow(ax, (2.45, 0.85), (3.55, 0.15))
        arrow(ax, (0.4, -0.05), (3.55, -0.05))  # the identity path
        arrow(ax, (4.45, 0), (5.25, 0))
        ax.set_title(title)
        ax.set_xlim(-0.8, 7)
        ax.set_ylim(-0.7, 1.5)
        ax.axis("off")
    return svg(figure)


def dense_block(num_convs: int = 4) -> str:
    """x0, then x_i = f_i([x0, ..., x_{i-1}]): every earlier output feeds every later block."""
    plt = pyplot()
    figure, ax = plt.subplots(figsize=(9, 2.8))
    xs = [2.0 * i for i in range(num_convs + 1)]
    for i, x in enumerate(xs):
        box(ax, x, 0, "x0" if i == 0 else f"f{i}", GREY if i == 0 else BLUE, width=0.9)
        for j in range(i + 1, len(xs)):
            arrow(ax, (x + 0.3, 0.3), (xs[j] - 0.3, 0.3), rad=-0.35 if j > i + 1 else 0.0, color=ORANGE)
    box(ax, xs[-1] + 2.3, 0, "concat", ORANGE, width=1.2)
    for x in xs:
        arrow(ax, (x, -0.3), (xs[-1] + 1.7, -0.25), rad=0.12, color=GREY)
    ax.text(xs[-1] / 2, -1.6, "x -> [x, f1(x), f2([x, f1(x)]), f3([x, f1(x), f2([x, f1(x)])]), ...]", ha="center")
    ax.set_xlim(-0.8, xs[-1] + 3.2)
    ax.set_ylim(-1.9, 2.4)
    ax.axis("off")
    return svg(figure)


def channel_growth(arch: str = "d2l") -> str:
    """One bar per layer that changes the width: the stem, every conv block, every transition."""
    spec = get_spec(arch)
    names, widths, colors = [], [], []
    for stage in channel_plan(spec):
        if stage.name.startswith("denseblock"):
            for i, layer in enumerate(stage.layers):
                names.append(f"b{stage.name[-1]}.{i + 1}")
                widths.append(layer.in_channels + spec.growth_rate)
                colors.append(BLUE)
        else:
            names.append(stage.name.replace("transition", "t"))
            widths.append(stage.out_channels)
            colors.append(GREY if stage.name == "stem" else ORANGE)
    plt = pyplot()
    figure, ax = plt.subplots(figsize=(9, 3))
    ax.bar(range(len(widths)), widths, color=colors)
    for i, width in enumerate(widths):
        ax.text(i, width + 3, str(width), ha="center", fontsize=7)
    ax.set_xticks(range(len(widths)), names, rotation=90, fontsize=8)
    ax.set_ylabel("channels")
    ax.set_title(
        f"{spec.name}: {spec.num_init_features} channels, growth {spec.growth_rate}, blocks {spec.block_config}"
    )
    return svg(figure)


FIGURES: dict[str, Callable[[], str]] = {
    "resnet_vs_densenet": resnet_vs_densenet,
    "dense_block": dense_block,
    "channel_growth": channel_growth,
}


def figure_path(name: str) -> str:
    return f"figures/{name}.svg"


def render_figure(name: str, page: str) -> str:
    if name not in FIGURES:
        raise LookupError(f"{page}: no figure {name!r}; known: {', '.join(FIGURES)}")
    import posixpath

    target = posixpath.relpath(figure_path(name), posixpath.dirname(page) or ".")
    return f"![{CAPTIONS[name]}]({target})\n\n*{CAPTIONS[name]}*\n"


def stage_parameters(spec) -> dict[str, int]:
    """Trainable parameters per stage (stem, denseblockN, transitionN, norm5 and classifier as 'head')."""
    counts: dict[str, int] = {}
    for key, shape in parameter_table(spec).items():
        if is_running_stat(key):
            continue
        part = key.split(".")[1] if key.startswith("features.") else "classifier"
        stage = "stem" if part.endswith("0") else "head" if part in ("norm5", "classifier") else part
        size = 1
        for n in shape:
            size *= n
        counts[stage] = counts.get(stage, 0) + size
    return counts


def render_stages(arch: str, size: int) -> str:
    """Markdown: every stage's output shape (N=1, NCHW) at `size`, its channels and its parameters."""
    spec = get_spec(arch)
    shapes, params = stage_shapes(spec, size), stage_parameters(spec)
    plan = {stage.name: stage for stage in channel_plan(spec)}
    rows = [
        f"**{spec.name}**: {spec.num_init_features} channels out of the stem, growth rate {spec.growth_rate}, "
        f"blocks {spec.block_config}, bottleneck {spec.bn_size or 'none'}, compression {spec.compression}; "
        f"at {size}x{size} with {spec.in_channels} input channel(s):",
        "",
        "| stage | output shape (N, C, H, W) | channels in -> out | parameters |",
        "| --- | --- | --- | ---: |",
    ]
    for name, shape in shapes.items():
        if name == "logits":
            stage, width = "norm5 + classifier", f"{plan[list(plan)[-1]].out_channels} -> {spec.num_classes}"
            count = params["head"]
        else:
            stage, width, count = name, f"{plan[name].in_channels} -> {plan[name].out_channels}", params[name]
        rows.append(f"| {stage} | {tuple(shape)} | {width} | {count:,} |")
    trainable = count_params(spec)[0]
    assert trainable == sum(params.values()), (trainable, params)
    rows.append(f"| **total** | | | **{trainable:,}** |")
    return "\n".join(rows) + "\n"


def generated_figures() -> dict[str, str]:
    """Site path -> SVG text, for every figure."""
    return {figure_path(name): draw() for name, draw in FIGURES.items()}
