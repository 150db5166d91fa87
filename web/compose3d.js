// Compose3D frontend extension. ComfyUI serves this folder (WEB_DIRECTORY) and loads every .js file in it.
import { app } from "../../scripts/app.js";

const CATEGORY = "Compose3D";
const COLOR = "#2a363b";
const BGCOLOR = "#3f5159";

app.registerExtension({
  name: "Compose3D.core",
  // Give every Compose3D node one colour so a pack's nodes are easy to pick out in a large graph.
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.category?.startsWith(CATEGORY)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      this.color ??= COLOR;
      this.bgcolor ??= BGCOLOR;
      // Seeds start fixed: the pack's nodes run for minutes, and a fixed seed lets ComfyUI reuse their result
      // when nothing else changed. A saved workflow's own choice is applied after this, when it is loaded.
      for (const widget of this.widgets ?? []) {
        if (widget.name === "control_after_generate") widget.value = "fixed";
      }
      return result;
    };
  },
});
