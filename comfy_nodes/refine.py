"""OpenSoraPromptRefine: a prompt rewritten by a chat model (the official `--llm-refine`) -> STRING.

A thin adapter over `opensora_sdk.refine.refine_prompt`: any OpenAI-compatible endpoint; the
API key comes from the OPENAI_API_KEY environment variable only, never from a widget, because
ComfyUI saves every widget value into the workflow and into each output file's metadata.
Connect the output to OpenSoraTextEncode's prompt (convert that widget to an input).
"""

from __future__ import annotations

from .types import CATEGORY, tip


class OpenSoraPromptRefine:
    DESCRIPTION = (
        "Rewrites a prompt into a detailed English video description with an LLM (as Open-Sora's --llm-refine), "
        "before the score suffixes are added. Any language in; an empty prompt gets a random one; with an image "
        "the model is shown it (image-to-video). Key: the OPENAI_API_KEY environment variable."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("prompt",)
    FUNCTION = "refine"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "prompt": ("STRING", tip(
                    "The prompt to refine (loop segments |0|...|2|... are refined one by one); empty: a random one",
                    multiline=True, dynamicPrompts=True, default="")),
                "model": ("STRING", tip("Chat model name; empty: $OPENSORA_REFINE_MODEL, else gpt-4o",
                                        default="")),
                "base_url": ("STRING", tip(
                    "OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1; empty: $OPENAI_BASE_URL, else OpenAI",
                    default="")),
                "fallback": ("BOOLEAN", tip("On failure keep the original prompt (a warning in the console) instead "
                                            "of stopping the workflow", default=False)),
                "timeout": ("FLOAT", tip("Seconds to wait for each request", default=60.0, min=1.0, max=600.0,
                                         step=1.0)),
            },
            "optional": {
                "image": ("IMAGE", tip("The first frame of an image-to-video generation; the model is shown it")),
            },
        }

    def refine(self, prompt, model, base_url, fallback, timeout, image=None):
        from opensora_sdk.refine import RefineEndpoint, refine_prompt

        endpoint = RefineEndpoint.from_env(None, base_url.strip() or None, model.strip() or None, timeout=timeout)
        first = None if image is None else image[0]  # IMAGE [N, H, W, 3] in [0, 1]: its first frame
        return (refine_prompt(prompt, image=first, endpoint=endpoint, fallback=bool(fallback)),)


NODES = {"OpenSoraPromptRefine": (OpenSoraPromptRefine, "Open-Sora Prompt Refine (LLM)")}
