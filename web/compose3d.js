// Compose3D frontend extension. ComfyUI serves this folder (WEB_DIRECTORY) and loads every .js file in it.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const CATEGORY = "Compose3D";
const COLOR = "#2a363b";
const BGCOLOR = "#3f5159";
// The read-only text box that shows a node's text output (ui "text"), e.g. Preview Cameras' JSON.
const REPORT_WIDGET = "compose3d_report";

// A JSON object with one line per key (nested values stay on their key's line); other JSON as it is.
function jsonLines(value) {
  if (value === null || typeof value !== "object" || Array.isArray(value)) return JSON.stringify(value);
  const lines = Object.entries(value).map(([k, v]) => ` ${JSON.stringify(k)}: ${JSON.stringify(v)}`);
  return `{\n${lines.join(",\n")}\n}`;
}

// Text a node sent with its outputs, readable: JSON one key per line, several texts one after the other.
function reportText(text) {
  const parts = Array.isArray(text) ? text : [text];
  return parts
    .map((part) => {
      try {
        return jsonLines(JSON.parse(part));
      } catch {
        return String(part);
      }
    })
    .join("\n\n");
}

// Show `text` in the node's report box, made on first use. The box is never saved with the workflow nor sent
// with a prompt: it only displays the last run's text.
function showReport(node, text) {
  let widget = node.widgets?.find((w) => w.name === REPORT_WIDGET);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, REPORT_WIDGET, ["STRING", { multiline: true }], app).widget;
    widget.serialize = false;
    widget.options = { ...(widget.options ?? {}), serialize: false };
    if (widget.inputEl) {
      widget.inputEl.readOnly = true;
      widget.inputEl.style.opacity = 0.85;
    }
  }
  widget.value = reportText(text);
  app.graph?.setDirtyCanvas?.(true, false);
}

app.registerExtension({
  name: "Compose3D.core",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.category?.startsWith(CATEGORY)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      // One colour for every Compose3D node, so the pack's nodes are easy to pick out in a large graph.
      this.color ??= COLOR;
      this.bgcolor ??= BGCOLOR;
      // Seeds start fixed: the pack's nodes run for minutes, and a fixed seed lets ComfyUI reuse their result
      // when nothing else changed. A saved workflow's own choice is applied after this, when it is loaded.
      for (const widget of this.widgets ?? []) {
        if (widget.name === "control_after_generate") widget.value = "fixed";
      }
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = onExecuted?.apply(this, arguments);
      if (message?.text?.length) showReport(this, message.text);
      return result;
    };
  },
});
