// The carseg viewer: one image, three calls with the same k and seed (samples, contours,
// uncertainty), drawn side by side. Paths are relative to the page, so the viewer keeps working
// behind a proxy that serves the API under a prefix.

const $ = (id) => document.getElementById(id);

// overlay colours by class index (0 is the background and stays clear)
const CLASS_COLOURS = [null, [255, 112, 67], [77, 208, 225], [186, 104, 200], [129, 199, 132], [255, 213, 79]];
// the levels differ in dash and width as well as colour, for readers who cannot tell the colours apart
const LEVEL_STYLES = new Map([
  [0.1, { colour: "#4cc9f0", dash: [5, 4], width: 1.5 }],
  [0.5, { colour: "#ffd166", dash: [], width: 2 }],
  [0.9, { colour: "#ef476f", dash: [], width: 3 }],
]);
const CONTOUR_DISPLAY_PX = 640; // the contour canvas is drawn at about this size, for crisp lines

const state = { file: null, result: null, thumbUrl: null };

class ApiError extends Error {
  constructor(status, error, detail) {
    super(detail);
    this.status = status;
    this.error = error;
  }
}

function authHeaders() {
  const key = $("key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: { Accept: "application/json", ...authHeaders() } });
  } catch (err) {
    throw new ApiError(0, "network_error", `the service did not answer (${err.message})`);
  }
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: a proxy's error page; the status line is all there is to say
  }
  if (!response.ok) {
    throw new ApiError(response.status, body?.error ?? "http_error", body?.detail ?? response.statusText);
  }
  return body;
}

function showError(err) {
  const box = $("error");
  const status = err.status ? ` (HTTP ${err.status})` : "";
  box.textContent = err instanceof ApiError ? `${err.error}: ${err.message}${status}` : `error: ${err.message}`;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function setStatus(text) {
  $("status").textContent = text;
}

function updateButtons(busy = false) {
  $("run").disabled = busy || !state.file || !$("model").value;
  $("download").disabled = busy || !state.result;
}

async function loadModels() {
  const select = $("model");
  const previous = select.value;
  try {
    const { models } = await api("v1/models");
    select.replaceChildren(...models.map((m) => new Option(`${m.name} (v${m.version}) · ${m.classes.slice(1).join(", ")}`, m.name)));
    const preferred = models.find((m) => m.name === previous) ?? models.find((m) => m.name === "default") ?? models[0];
    if (preferred) select.value = preferred.name;
    if (!models.length) setStatus("The service serves no models.");
    clearError();
  } catch (err) {
    select.replaceChildren();
    showError(err);
  }
  updateButtons();
}

function randomSeed() {
  return String(crypto.getRandomValues(new Uint32Array(1))[0] >>> 1);
}

function chooseFile(file) {
  if (!file) return;
  state.file = file;
  $("file-name").textContent = file.name;
  const thumb = $("thumb");
  if (state.thumbUrl) URL.revokeObjectURL(state.thumbUrl);
  state.thumbUrl = URL.createObjectURL(file);
  thumb.onload = () => { thumb.hidden = false; };
  thumb.onerror = () => { thumb.hidden = true; }; // DICOM, NIfTI: the browser cannot show them, the service can
  thumb.src = state.thumbUrl;
  updateButtons();
}

function infer(route, model, params) {
  const form = new FormData();
  form.append("image", state.file, state.file.name);
  return api(`v1/models/${encodeURIComponent(model)}/${route}?${new URLSearchParams(params)}`, { method: "POST", body: form });
}

async function run(event) {
  event.preventDefault();
  clearError();
  const model = $("model").value;
  const k = $("k").value.trim();
  if (!/^[0-9]+$/.test(k)) return showError(new Error("k must be a whole number"));
  // the three calls agree only with one seed: draw it here, never leave it to each call
  if (!$("seed").value.trim()) $("seed").value = randomSeed();
  const seed = $("seed").value.trim();
  if (!/^[0-9]+$/.test(seed)) return showError(new Error("the seed must be a whole number"));

  updateButtons(true);
  setStatus(`Sampling ${k} masks…`);
  const started = performance.now();
  try {
    const [samples, contours, uncertainty] = await Promise.all([
      infer("samples", model, { k, seed }),
      infer("contours", model, { k, seed }),
      infer("uncertainty", model, { k, seed, preview: "true" }),
    ]);
    state.result = { file: state.file.name, samples, contours, uncertainty };
    await render(state.result);
    setStatus(`Done in ${((performance.now() - started) / 1000).toFixed(1)} s.`);
  } catch (err) {
    setStatus("");
    showError(err);
  } finally {
    updateButtons();
  }
}

function loadPng(base64) {
  const img = new Image();
  img.src = `data:image/png;base64,${base64}`;
  return img.decode().then(() => img);
}

function pixels(img) {
  const canvas = new OffscreenCanvas(img.naturalWidth, img.naturalHeight);
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  return ctx.getImageData(0, 0, canvas.width, canvas.height).data;
}

function canvasOf(width, height, label) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  canvas.className = "pixelated";
  canvas.setAttribute("role", "img");
  canvas.setAttribute("aria-label", label);
  return canvas;
}

// a mask over the image: its classes filled translucent, their boundaries opaque
function drawMask(base, mask, width, height, label) {
  const canvas = canvasOf(width, height, label);
  const ctx = canvas.getContext("2d");
  ctx.drawImage(base, 0, 0);
  const out = ctx.getImageData(0, 0, width, height);
  const classOf = (x, y) => mask[4 * (y * width + x)];
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const c = classOf(x, y);
      if (c === 0) continue;
      const colour = CLASS_COLOURS[c % CLASS_COLOURS.length] ?? CLASS_COLOURS[1];
      const edge = x === 0 || y === 0 || x === width - 1 || y === height - 1 ||
        classOf(x - 1, y) !== c || classOf(x + 1, y) !== c || classOf(x, y - 1) !== c || classOf(x, y + 1) !== c;
      const alpha = edge ? 0.9 : 0.35;
      const i = 4 * (y * width + x);
      for (let j = 0; j < 3; j++) out.data[i + j] = Math.round((1 - alpha) * out.data[i + j] + alpha * colour[j]);
    }
  }
  ctx.putImageData(out, 0, 0);
  return canvas;
}

// the fraction of samples labelling a class, as that class's colour over the image
function drawMean(base, mean, width, height, colour, label) {
  const canvas = canvasOf(width, height, label);
  const ctx = canvas.getContext("2d");
  ctx.drawImage(base, 0, 0);
  const out = ctx.getImageData(0, 0, width, height);
  for (let i = 0; i < out.data.length; i += 4) {
    const alpha = 0.85 * (mean[i] / 255);
    for (let j = 0; j < 3; j++) out.data[i + j] = Math.round((1 - alpha) * out.data[i + j] + alpha * colour[j]);
  }
  ctx.putImageData(out, 0, 0);
  return canvas;
}

function drawContours(canvas, base, contours) {
  const { width, height } = contours;
  const scale = Math.max(1, Math.min(Math.ceil(CONTOUR_DISPLAY_PX / Math.max(width, height)), Math.floor(4096 / Math.max(width, height))));
  canvas.width = width * scale;
  canvas.height = height * scale;
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(base, 0, 0, canvas.width, canvas.height);
  ctx.lineJoin = "round";
  // pixel centres are at integer coordinates: pixel x spans [x - 0.5, x + 0.5]
  const at = (v) => (v + 0.5) * scale;
  for (const levels of Object.values(contours.contours)) {
    for (const { level, polygons } of levels) {
      const style = LEVEL_STYLES.get(level) ?? { colour: "#ffffff", dash: [], width: 1 };
      ctx.strokeStyle = style.colour;
      ctx.lineWidth = style.width;
      ctx.setLineDash(style.dash);
      ctx.beginPath();
      for (const polygon of polygons) {
        polygon.forEach(([x, y], i) => (i === 0 ? ctx.moveTo(at(x), at(y)) : ctx.lineTo(at(x), at(y))));
        ctx.closePath();
      }
      ctx.stroke();
    }
  }
}

async function render({ samples, contours, uncertainty }) {
  const { width, height } = contours;
  const base = await loadPng(contours.image);
  const masks = await Promise.all(samples.masks.map(loadPng));

  const grid = $("samples");
  grid.replaceChildren(...masks.map((img, i) => {
    const figure = document.createElement("figure");
    figure.className = "sample";
    figure.append(drawMask(base, pixels(img), width, height, `Sample ${i + 1} of ${samples.k}: mask over the image`));
    const caption = document.createElement("figcaption");
    caption.textContent = `#${i + 1}`;
    figure.append(caption);
    return figure;
  }));
  $("sample-count").textContent = `(k = ${samples.k})`;

  const means = await Promise.all(Object.entries(contours.mean).map(async ([name, b64], i) => {
    const colour = CLASS_COLOURS[(i + 1) % CLASS_COLOURS.length] ?? CLASS_COLOURS[1];
    const figure = document.createElement("figure");
    figure.append(drawMean(base, pixels(await loadPng(b64)), width, height, colour, `Fraction of samples labelling ${name}`));
    if (Object.keys(contours.mean).length > 1) {
      const caption = document.createElement("figcaption");
      caption.textContent = name;
      figure.append(caption);
    }
    return figure;
  }));
  $("means").replaceChildren(...means);

  drawContours($("contours"), base, contours);

  $("heat").src = `data:image/png;base64,${uncertainty.preview}`;
  $("heat-max").textContent = `log ${uncertainty.classes.length} ≈ ${Math.log(uncertainty.classes.length).toFixed(2)} nats`;

  $("summary").textContent = `${samples.model} v${samples.version} · k = ${samples.k} · seed ${samples.seed} · ${width} × ${height} px · ${state.result.file}`;
  $("empty").hidden = true;
  $("output").hidden = false;
}

function download() {
  const { samples } = state.result;
  const blob = new Blob([JSON.stringify(state.result)], { type: "application/json" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `carseg-${samples.model}-v${samples.version}-k${samples.k}-seed${samples.seed}.json`;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
}

function wireDrop() {
  const drop = $("drop");
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    chooseFile(event.dataTransfer.files[0]);
  });
}

function init() {
  $("controls").addEventListener("submit", run);
  $("file").addEventListener("change", (event) => chooseFile(event.target.files[0]));
  $("model").addEventListener("change", () => updateButtons());
  $("key").addEventListener("change", loadModels); // a key may be what the listing was missing
  $("reseed").addEventListener("click", () => { $("seed").value = randomSeed(); });
  $("download").addEventListener("click", download);
  wireDrop();
  loadModels();
}

init();
