// Unknown prompt words, shown to the user. Prompt Enhancer and the edit nodes name the words the model
// does not know in ComfyUI's log and in their `ui.text` result, which reaches the browser in the
// `executed` message; the stock frontend (1.x) shows `text` for no node of ours. So each line becomes a
// warning toast, and stays drawn under the node until the next run starts. Nothing of it is saved: no
// widget, no property, so widgets_values of saved workflows stay as they are.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const PREFIX = "LayerDiff";
const NOTE = "layerdiffUnknownWords"; // a plain field: LGraphNode.serialize writes only its own keys
const TOAST_LIFE_MS = 15000;
const NOTE_FONT_PX = 11;
const NOTE_LINE_PX = 14;
const NOTE_MAX_LINES = 4;
const NOTE_COLOR = "#e0a83a";

const noted = new Set(); // nodes carrying a note, cleared when the next prompt starts

// Execution ids of nodes inside subgraphs are paths, "12:5": node 5 of the subgraph of node 12.
function nodeByExecutionId(id) {
  let graph = app.graph;
  let node = null;
  for (const part of String(id).split(":")) {
    if (!graph?.getNodeById) return null;
    node = graph.getNodeById(part) ?? graph.getNodeById(Number(part)) ?? null;
    if (!node) return null;
    graph = node.subgraph;
  }
  return node;
}

function isOurs(node) {
  const type = node?.comfyClass ?? node?.type;
  return typeof type === "string" && type.startsWith(PREFIX);
}

function textLines(output) {
  const text = output?.text;
  const lines = Array.isArray(text) ? text : text == null ? [] : [text];
  return lines.map((line) => String(line ?? "").trim()).filter(Boolean);
}

function toast(summary, detail) {
  const toasts = app.extensionManager?.toast;
  if (typeof toasts?.add === "function") {
    toasts.add({ severity: "warn", summary, detail, life: TOAST_LIFE_MS });
  } else if (typeof toasts?.addAlert === "function") {
    toasts.addAlert(`${summary}: ${detail}`);
  }
}

// Greedy word wrap to `width` canvas units; the last line ends in an ellipsis when text is left over.
function wrap(ctx, text, width, maxLines) {
  const lines = [];
  let line = "";
  const words = text.split(/\s+/);
  for (let i = 0; i < words.length; i++) {
    const next = line ? `${line} ${words[i]}` : words[i];
    if (!line || ctx.measureText(next).width <= width) {
      line = next;
      continue;
    }
    if (lines.length === maxLines - 1) {
      let cut = `${line} ${words.slice(i).join(" ")}`;
      while (cut.length > 1 && ctx.measureText(`${cut}…`).width > width) cut = cut.slice(0, -1);
      lines.push(`${cut.trimEnd()}…`);
      return lines;
    }
    lines.push(line);
    line = words[i];
  }
  if (line) lines.push(line);
  return lines;
}

function drawNote(node, ctx) {
  const note = node[NOTE];
  if (!note || node.flags?.collapsed) return;
  ctx.save();
  ctx.font = `${NOTE_FONT_PX}px sans-serif`;
  ctx.fillStyle = NOTE_COLOR;
  ctx.textAlign = "left";
  ctx.textBaseline = "top";
  const lines = wrap(ctx, `⚠ ${note}`, Math.max(node.size[0] - 8, 60), NOTE_MAX_LINES);
  lines.forEach((line, i) => ctx.fillText(line, 4, node.size[1] + 6 + i * NOTE_LINE_PX));
  ctx.restore();
}

function clearNotes() {
  for (const node of noted) delete node[NOTE];
  noted.clear();
}

function onExecuted({ detail }) {
  const lines = textLines(detail?.output);
  if (!lines.length) return;
  const node = nodeByExecutionId(detail.display_node ?? detail.node);
  if (!isOurs(node)) return;
  const summary = `${node.title || node.type}: unknown prompt words`;
  for (const line of lines) toast(summary, line);
  node[NOTE] = lines.join(" ");
  noted.add(node);
  node.setDirtyCanvas?.(true, false);
}

app.registerExtension({
  name: "LayerDiff.UnknownWords",
  setup() {
    api.addEventListener("executed", onExecuted);
    api.addEventListener("execution_start", clearNotes);
  },
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (!String(nodeData?.name ?? "").startsWith(PREFIX)) return;
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const result = onDrawForeground?.apply(this, arguments);
      drawNote(this, ctx);
      return result;
    };
  },
});
