// Compose3D frontend extension. ComfyUI serves this folder (WEB_DIRECTORY) and loads every .js file in it.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const CATEGORY = "Compose3D";
const COLOR = "#2a363b";
const BGCOLOR = "#3f5159";
// The read-only text box that shows a node's text output (ui "text"), e.g. Preview Cameras' JSON.
const REPORT_WIDGET = "compose3d_report";
// The legend drawn above a node's part or heat-map preview (ui "compose3d_legend", see nodes/common.py).
const LEGEND_WIDGET = "compose3d_legend";
const LEGEND_ROW = 18; // canvas units per legend row
const LEGEND_CHIP = 12;
const LEGEND_LEADS = { colors: "parts:", columns: "left to right:" };

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

// Lay out the legend's chips from x = 15 in rows of `width`: [{x, y, name, color}] (y relative to the widget).
function legendChips(ctx, legend, width) {
  const chips = [];
  let x = 15 + ctx.measureText(LEGEND_LEADS[legend.layout] ?? "").width + 8;
  let row = 0;
  for (const part of legend.parts) {
    const room = LEGEND_CHIP + 4 + ctx.measureText(part.name).width + 12;
    if (chips.length && x + room > width - 15) {
      row += 1;
      x = 15;
    }
    chips.push({ x, y: row * LEGEND_ROW + (LEGEND_ROW - LEGEND_CHIP) / 2, name: part.name, color: part.color });
    x += room;
  }
  return { chips, rows: row + 1 };
}

// A canvas widget showing which colour is which part ("colors") or the order of a heat map's columns
// ("columns"). It only displays the last run's legend: never saved, never sent with a prompt.
function showLegend(node, legend) {
  let widget = node.widgets?.find((w) => w.name === LEGEND_WIDGET);
  if (!widget) {
    node.addCustomWidget({
      name: LEGEND_WIDGET,
      type: "compose3d_legend",
      value: null,
      serialize: false,
      options: { serialize: false },
      rows: 1,
      computeSize(width) {
        return [width, this.rows * LEGEND_ROW + 4];
      },
      draw(ctx, _node, width, y) {
        const legend = this.value;
        if (!legend?.parts?.length) return;
        ctx.save();
        ctx.font = "12px sans-serif";
        ctx.textBaseline = "middle";
        const { chips, rows } = legendChips(ctx, legend, width);
        this.rows = rows;
        ctx.fillStyle = globalThis.LiteGraph?.WIDGET_SECONDARY_TEXT_COLOR ?? "#999";
        ctx.fillText(LEGEND_LEADS[legend.layout] ?? "", 15, y + LEGEND_ROW / 2);
        for (const chip of chips) {
          ctx.fillStyle = chip.color;
          ctx.fillRect(chip.x, y + chip.y, LEGEND_CHIP, LEGEND_CHIP);
          ctx.fillStyle = globalThis.LiteGraph?.WIDGET_TEXT_COLOR ?? "#ddd";
          ctx.fillText(chip.name, chip.x + LEGEND_CHIP + 4, y + chip.y + LEGEND_CHIP / 2);
        }
        // where each chip was drawn, in node coordinates (read by the browser test)
        this.drawnChips = chips.map((c) => ({ ...c, y: y + c.y, size: LEGEND_CHIP }));
        ctx.restore();
      },
    });
    widget = node.widgets.find((w) => w.name === LEGEND_WIDGET);
    // above the node's images: just before the frontend's image-preview widget, if it is there already
    const preview = node.widgets.findIndex((w) => w.name?.startsWith("$$canvas-image-preview"));
    if (preview >= 0 && preview < node.widgets.indexOf(widget)) {
      node.widgets.splice(node.widgets.indexOf(widget), 1);
      node.widgets.splice(preview, 0, widget);
    }
  }
  widget.value = legend;
  const needed = node.computeSize();
  if (node.size[1] < needed[1]) node.setSize([node.size[0], needed[1]]);
  app.graph?.setDirtyCanvas?.(true, true);
}

// A node that previews its progress and then shows images of its own (SD3 Attention Capture's heat maps) would
// keep showing the last progress preview: the frontend puts previews first until the node runs again. When the
// node's own images arrive, its progress preview goes.
function dropProgressPreview(node) {
  const previews = app.nodePreviewImages;
  const key = String(node.id);
  if (!previews?.[key]) return;
  for (const url of previews[key]) URL.revokeObjectURL(url);
  delete previews[key];
  node.setDirtyCanvas?.(true, true);
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
      const legend = message?.[LEGEND_WIDGET];
      if (legend?.length) showLegend(this, legend[legend.length - 1]);
      if (message?.images?.length) dropProgressPreview(this);
      return result;
    };
  },
});
