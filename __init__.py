"""ComfyUI entry point of the Open-Sora node pack (see comfy_nodes/).

ComfyUI imports this file as a package; pytest may import it as a plain module, so the
relative import only runs when there is a package.
"""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

if __package__:  # an import error (e.g. a missing dependency) reaches ComfyUI's log as it is
    from .comfy_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
