"""VCD (CVPR 2024): contrast the next-token logits with those of a diffusion-noised copy of the image."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from mitigation.methods.registry import Method, Preset, param, register
from mitigation.seam.request import Contribution, RequestContext, SecondStream


def contrast(alpha: float, beta: float):
    """VCD's step as a logits step: (1 + alpha) * l - alpha * l_noised, keeping only the tokens whose plain
    logit l >= log(beta) + max l (the adaptive plausibility constraint; on logits this is p >= beta * max p).
    beta = 0 keeps every token."""

    def step(main: torch.Tensor, noised: torch.Tensor | None) -> torch.Tensor:
        if alpha == 0:
            out = main.float()
        elif noised is None:
            raise RuntimeError("vcd needs the noised-image stream's logits")
        else:
            out = (1 + alpha) * main.float() - alpha * noised.float()
        if beta > 0:
            cut = math.log(beta) + main.float().max(-1, keepdim=True).values
            out = out.masked_fill(main < cut, float("-inf"))
        return out

    return step


@register("vcd")
@dataclass(frozen=True)
class VCD(Method):
    """VCD: at every step, contrast the model with itself on a noised image.

    A second stream runs in the same batch with its own rows of the KV cache: the same prompt, the image's
    normalised pixels diffused to step `noise_step` of a 1000-step schedule (betas sigmoid(linspace(-6, 6))
    scaled to [1e-5, 5e-3]; x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, eps from `seed`,
    `mitigation.seam.request.noised_pixels`). Each next-token distribution is softmax((1 + alpha) * l -
    alpha * l_noised) over the tokens with p >= beta * max p (the plain distribution's). No attention is
    edited, so VCD composes with every attention method (`vcd+var`, `vcd+vhr`: their streams get their own
    rows); with another method that reads a second stream's logits it composes too (pai's guidance and VCD
    each read their own stream, applied in list order).

    Decoding: the paper's numbers sample (multinomial, temperature 1, top-p 1, no top-k: the official
    script's defaults), and VCD is a change of the distribution, so it applies to greedy and sampled
    decoding alike: pass `--temperature 1` for the paper's protocol. Third-party reproductions find plain
    greedy decoding beats sampling+VCD on POPE, so compare against both baselines (docs/evals.md).

    Presets. `official` (the default) is DAMO-NLP-SG/VCD@d6568ff experiments/cd_scripts/llava1.5_pope.bash
    (cd_alpha 1, cd_beta 0.2, noise_step 500), the one evaluation script the repository ships. `paper` is
    alpha 1, beta 0.1, step 500: the paper's setting as the code's argument defaults carry it
    (experiments/eval/object_hallucination_vqa_llava.py:115-118) and HALC's port uses it; the PDF itself was
    not read here. The script's prompt suffix ("Please answer
    this question with one word.") is the evaluation's, not the method's: Lucid's suites keep LLaVA-1.5's.
    The noise is seeded (`seed`) where the official code draws from the global generator. alpha = 0 runs no
    second stream; with beta = 0 too it is the baseline bit for bit (greedy or sampled), and alpha = 0 alone
    gives the baseline's greedy answers.
    """

    paper: ClassVar[str] = (
        "Leng, Zhang, Chen, Li, Lu, Miao, Bing. Mitigating Object Hallucinations in Large Vision-Language Models "
        "through Visual Contrastive Decoding. CVPR 2024, arXiv:2311.16922"
    )

    PRESETS: ClassVar[dict[str, Preset]] = {
        "official": Preset(
            {"alpha": 1.0, "beta": 0.2, "noise_step": 500},
            "DAMO-NLP-SG/VCD@d6568ff experiments/cd_scripts/llava1.5_pope.bash:5-7 (cd_alpha 1, cd_beta 0.2, "
            "noise_step 500); vcd_utils/vcd_sample.py (the contrast and the cut-off on logits)",
        ),
        "paper": Preset(
            {"alpha": 1.0, "beta": 0.1, "noise_step": 500},
            "arXiv:2311.16922 as the code's argument defaults carry it (the PDF not read here): "
            "experiments/eval/object_hallucination_vqa_llava.py:115-118 (noise_step 500, cd_alpha 1, cd_beta 0.1)",
        ),
    }

    logits_only: ClassVar[bool] = True  # edits no attention: composes with own-prefill methods (dyvte)

    alpha: float = param(1.0, "contrast strength: (1+alpha)*l - alpha*l_noised; 0 = off", min=0.0, max=10.0)
    beta: float = param(0.2, "plausibility cut: keep tokens with p >= beta * max p; 0 = keep all", min=0.0, max=1.0)
    noise_step: int = param(500, "diffusion step of the noised image, 0..999 (999: almost pure noise)", min=0, max=999)
    seed: int = param(0, "seed of the Gaussian noise", min=0)

    def second_stream(self) -> SecondStream | None:
        if self.alpha == 0:
            return None  # no contrast: only the plausibility cut, which reads the plain logits
        return SecondStream("noise", until="end", read_by_logits=True, noise_step=self.noise_step, noise_seed=self.seed)

    def contribute(self, ctx: RequestContext) -> Contribution:
        return Contribution(logits=contrast(self.alpha, self.beta))
