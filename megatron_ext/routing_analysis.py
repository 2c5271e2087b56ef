"""Language-expert signatures from routing counts: correlation, clustering, entropy, plots.

Pure NumPy/SciPy/matplotlib on count arrays, so it is testable with planted routings.

counts[lang] is an array [layers, experts]: how many of the language's tokens each expert
received in each MoE layer (each token counts once per expert it is routed to, k per layer).
The signature normalises each layer to shares that sum to 1; the paper compares languages by
the Pearson correlation of their signatures over all (layer, expert) cells.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

import numpy as np


@dataclass
class RoutingAnalysis:
    languages: list[str]
    layers: list[int]  # global 0-based MoE layer indices the arrays cover
    signatures: np.ndarray  # [languages, layers, experts], shares per layer summing to 1
    tokens: np.ndarray  # [languages] tokens seen per language
    correlation: np.ndarray  # [languages, languages] Pearson over flattened signatures
    linkage: np.ndarray  # SciPy linkage matrix (average linkage on 1 - correlation)
    leaf_order: list[str]  # languages in dendrogram order
    entropy: np.ndarray  # [languages, layers] routing entropy in bits
    unused_experts: dict[int, list[int]]  # layer -> experts no language's token reached


def analyse(counts: dict[str, np.ndarray], tokens: dict[str, int], layers: list[int]) -> RoutingAnalysis:
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    languages = list(counts)
    if len(languages) < 2:
        raise ValueError(f"need at least two languages to compare, got {languages}")
    stacked = np.stack([np.asarray(counts[lang], dtype=np.float64) for lang in languages])
    per_layer = stacked.sum(axis=2, keepdims=True)
    for i, lang in enumerate(languages):
        if (per_layer[i] == 0).any():
            raise ValueError(f"language {lang!r} has no routed tokens")
    signatures = stacked / per_layer
    correlation = np.corrcoef(signatures.reshape(len(languages), -1))
    distance = np.clip(1.0 - correlation, 0.0, None)
    np.fill_diagonal(distance, 0.0)
    link = linkage(squareform(distance, checks=False), method="average")
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(signatures > 0, signatures * np.log2(signatures), 0.0)
    unused = stacked.sum(axis=0) == 0  # [layers, experts]
    return RoutingAnalysis(
        languages=languages,
        layers=list(layers),
        signatures=signatures,
        tokens=np.array([tokens[lang] for lang in languages]),
        correlation=correlation,
        linkage=link,
        leaf_order=[languages[i] for i in leaves_list(link)],
        entropy=-plogp.sum(axis=2),
        unused_experts={layer: np.flatnonzero(unused[j]).tolist() for j, layer in enumerate(layers)},
    )


def clusters(result: RoutingAnalysis, num_clusters: int) -> list[set[str]]:
    """The languages cut into `num_clusters` groups by the dendrogram."""
    from scipy.cluster.hierarchy import fcluster

    labels = fcluster(result.linkage, t=num_clusters, criterion="maxclust")
    groups: dict[int, set[str]] = {}
    for lang, label in zip(result.languages, labels):
        groups.setdefault(int(label), set()).add(lang)
    return sorted(groups.values(), key=lambda g: sorted(g))


def signatures_csv(result: RoutingAnalysis) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["language", "layer", "expert", "share"])
    for i, lang in enumerate(result.languages):
        for j, layer in enumerate(result.layers):
            for expert, share in enumerate(result.signatures[i, j]):
                writer.writerow([lang, layer, expert, f"{share:.6g}"])
    return out.getvalue()


def correlation_figure(result: RoutingAnalysis, title: str = "Language-expert signature correlation"):
    """Heatmap of the correlation matrix in dendrogram order, with the dendrogram on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.cluster.hierarchy import dendrogram

    n = len(result.languages)
    size = max(4.0, 0.4 * n + 2.5)
    fig = plt.figure(figsize=(size, size * 1.2))
    # Heatmap and dendrogram share their x extent so the leaves sit over the columns
    # (SciPy draws leaf i at x = 10 * i + 5).
    left, width = 0.12, 0.72
    top = fig.add_axes([left, 0.80, width, 0.14])
    dendrogram(result.linkage, labels=result.languages, ax=top, no_labels=True,
               color_threshold=0, above_threshold_color="0.25")
    top.set_xlim(0, 10 * n)
    top.axis("off")
    top.set_title(title)
    order = [result.languages.index(lang) for lang in result.leaf_order]
    heat = fig.add_axes([left, 0.08, width, 0.71])
    image = heat.imshow(result.correlation[np.ix_(order, order)], cmap="RdBu_r", vmin=-1, vmax=1,
                        aspect="auto")
    heat.set_xticks(range(n), result.leaf_order, rotation=90)
    heat.set_yticks(range(n), result.leaf_order)
    bar = fig.add_axes([left + width + 0.02, 0.08, 0.03, 0.71])
    fig.colorbar(image, cax=bar, label="Pearson r")
    return fig


def figure_to_rgb(fig) -> np.ndarray:
    """HWC uint8 pixels (for TensorBoard images)."""
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return pixels
