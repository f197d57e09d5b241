// Upload for Load PSD as Layers. ComfyUI's own `image_upload` button (frontend 1.x) offers only
// PNG/JPEG/WebP in its file chooser, ignores any picked or dropped file whose MIME type does not start
// with image/ (browsers give a .psd image/vnd.adobe.photoshop or no type, depending on the system) and
// would preview the combo's file as an image. So a combo input that carries our option
// `layerdiff_upload` (".psd,.psb", set in nodes/io.py) gets a button of its own: pick a file (or drop it
// on the node), POST it to /upload/image (which stores any file type in the input folder), select it.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const OPTION = "layerdiff_upload";

function extensionsOf(spec) {
  return String(spec).split(",").map((e) => e.trim().toLowerCase()).filter(Boolean);
}

function accepted(file, extensions) {
  const name = file.name.toLowerCase();
  return extensions.some((ext) => name.endsWith(ext));
}

function alertUser(message) {
  console.error(`[LayerDiff] ${message}`);
  app.extensionManager?.toast?.addAlert?.(message);
}

async function uploadToInput(file) {
  const body = new FormData();
  body.append("image", file); // the endpoint's field name; the content is not checked to be an image
  body.append("type", "input");
  const resp = await api.fetchApi("/upload/image", { method: "POST", body });
  if (resp.status !== 200) {
    throw new Error(`uploading ${file.name} failed: ${resp.status} ${resp.statusText}`);
  }
  const data = await resp.json();
  return data.subfolder ? `${data.subfolder}/${data.name}` : data.name;
}

function addUploadButton(node, inputName, extensions) {
  const combo = node.widgets?.find((w) => w.name === inputName);
  if (!combo) return;

  const uploadFirst = async (files) => {
    const file = files.find((f) => accepted(f, extensions));
    if (!file) {
      alertUser(`${files.map((f) => f.name).join(", ")}: not a ${extensions.join("/")} file`);
      return;
    }
    try {
      const name = await uploadToInput(file);
      combo.options.values ??= [];
      if (!combo.options.values.includes(name)) combo.options.values.push(name);
      combo.value = name;
      combo.callback?.(name);
      node.graph?.setDirtyCanvas(true, true);
    } catch (error) {
      alertUser(String(error?.message ?? error));
    }
  };

  const chooser = document.createElement("input");
  chooser.type = "file";
  chooser.accept = extensions.join(",");
  chooser.onchange = async () => {
    const files = Array.from(chooser.files ?? []);
    chooser.value = ""; // choosing the same file again fires onchange again
    if (files.length) await uploadFirst(files);
  };

  const button = node.addWidget("button", `${inputName}_upload`, null, () => chooser.click(), {
    serialize: false,
  });
  button.label = `choose ${extensions.join("/")} to upload`;
  button.serialize = false; // not in widgets_values: the saved workflow holds only the file name

  const onDragOver = node.onDragOver;
  node.onDragOver = function (event) {
    const items = Array.from(event?.dataTransfer?.items ?? []);
    return items.some((item) => item.kind === "file") || !!onDragOver?.apply(this, arguments);
  };
  const onDragDrop = node.onDragDrop;
  node.onDragDrop = async function (event) {
    const files = Array.from(event?.dataTransfer?.files ?? []);
    if (!files.some((f) => accepted(f, extensions))) return (await onDragDrop?.apply(this, arguments)) ?? false;
    await uploadFirst(files);
    return true;
  };
}

app.registerExtension({
  name: "LayerDiff.PsdUpload",
  beforeRegisterNodeDef(nodeType, nodeData) {
    const uploads = Object.entries(nodeData?.input?.required ?? {})
      .filter(([, spec]) => Array.isArray(spec) && spec[1]?.[OPTION])
      .map(([name, spec]) => [name, extensionsOf(spec[1][OPTION])]);
    if (!uploads.length) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      for (const [name, extensions] of uploads) addUploadButton(this, name, extensions);
      return result;
    };
  },
});
