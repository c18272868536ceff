// GSP image search page: upload a query, show matches, draw heatmaps from the numeric grids.
// Heatmaps are rendered once per image onto a <canvas> (bilinear upscaling + colour map);
// opacity and visibility are CSS, so the slider and the toggle act instantly.
"use strict";

const $ = (id) => document.getElementById(id);
const form = $("search-form");
const dropZone = $("drop-zone");
const fileInput = $("file-input");
const button = $("search-button");
const status = $("status");
const results = $("results");
let chosenFile = null;
let queryUrl = null;

// Colour map stops (t, r, g, b): dark blue -> blue -> cyan -> yellow -> red.
const STOPS = [
  [0.0, 10, 10, 120], [0.25, 30, 90, 230], [0.5, 40, 200, 220],
  [0.75, 250, 220, 40], [1.0, 220, 30, 30],
];

function colour(t) {
  for (let i = 1; i < STOPS.length; i++) {
    if (t <= STOPS[i][0]) {
      const [t0, r0, g0, b0] = STOPS[i - 1];
      const [t1, r1, g1, b1] = STOPS[i];
      const f = (t - t0) / (t1 - t0 || 1);
      return [r0 + f * (r1 - r0), g0 + f * (g1 - g0), b0 + f * (b1 - b0)];
    }
  }
  return STOPS[STOPS.length - 1].slice(1);
}

// Sample the grid at continuous coordinates (cell centres at i + 0.5), clamped at the edges.
function bilinear(grid, y, x) {
  const h = grid.length, w = grid[0].length;
  const gy = Math.min(Math.max(y - 0.5, 0), h - 1), gx = Math.min(Math.max(x - 0.5, 0), w - 1);
  const y0 = Math.floor(gy), x0 = Math.floor(gx);
  const y1 = Math.min(y0 + 1, h - 1), x1 = Math.min(x0 + 1, w - 1);
  const fy = gy - y0, fx = gx - x0;
  const top = grid[y0][x0] * (1 - fx) + grid[y0][x1] * fx;
  const bottom = grid[y1][x0] * (1 - fx) + grid[y1][x1] * fx;
  return top * (1 - fy) + bottom * fy;
}

// Draw `heatmap.grid` over the centred square the network saw (crop_fraction of the short side).
function drawHeatmap(canvas, img, heatmap, cropFraction) {
  const grid = heatmap.grid;
  if (!grid.length || !grid[0].length) return;
  const w = img.naturalWidth, h = img.naturalHeight;
  const side = Math.min(w, h) * cropFraction;
  canvas.style.left = `${((w - side) / 2 / w) * 100}%`;
  canvas.style.top = `${((h - side) / 2 / h) * 100}%`;
  canvas.style.width = `${(side / w) * 100}%`;
  canvas.style.height = `${(side / h) * 100}%`;
  const size = 128;
  canvas.width = size;
  canvas.height = size;
  let lo = Infinity, hi = -Infinity;
  for (const row of grid) for (const v of row) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  const span = hi - lo > 1e-9 ? hi - lo : 1;
  const ctx = canvas.getContext("2d");
  const pixels = ctx.createImageData(size, size);
  const rows = grid.length, cols = grid[0].length;
  for (let py = 0; py < size; py++) {
    for (let px = 0; px < size; px++) {
      const v = bilinear(grid, ((py + 0.5) / size) * rows, ((px + 0.5) / size) * cols);
      const t = hi - lo > 1e-9 ? (v - lo) / span : 0.5;
      const [r, g, b] = colour(t);
      const o = (py * size + px) * 4;
      pixels.data[o] = r; pixels.data[o + 1] = g; pixels.data[o + 2] = b; pixels.data[o + 3] = 255;
    }
  }
  ctx.putImageData(pixels, 0, 0);
  canvas.dataset.drawn = "true";
}

function whenLoaded(img, callback) {
  if (img.complete && img.naturalWidth) callback();
  else img.addEventListener("load", callback, { once: true });
}

function setStatus(text, isError = false) {
  status.textContent = text;
  status.classList.toggle("error", isError);
}

function choose(file) {
  if (!file) return;
  chosenFile = file;
  button.disabled = false;
  if (queryUrl) URL.revokeObjectURL(queryUrl);
  queryUrl = URL.createObjectURL(file);
  $("drop-help").textContent = `Selected: ${file.name}. Press Search, or choose another file.`;
  search();
}

function matchTile(match, cropFraction) {
  const item = document.createElement("li");
  const figure = document.createElement("figure");
  figure.className = "tile";
  const stack = document.createElement("div");
  stack.className = "stack";
  const link = document.createElement("a");
  link.href = match.image_url;
  link.target = "_blank";
  link.rel = "noopener";
  const img = document.createElement("img");
  img.src = match.thumbnail_url;
  img.alt = `Match ${match.rank}${match.label ? `, label ${match.label}` : ""}`;
  link.append(img);
  stack.append(link);
  if (match.heatmap) {
    const canvas = document.createElement("canvas");
    canvas.className = "heatmap";
    canvas.dataset.heatmap = "match";
    canvas.setAttribute("aria-hidden", "true");
    stack.append(canvas);
    whenLoaded(img, () => drawHeatmap(canvas, img, match.heatmap, cropFraction));
  }
  const caption = document.createElement("figcaption");
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = `#${match.rank} · ${match.score.toFixed(3)}`;
  caption.append(score, document.createElement("br"),
    document.createTextNode(match.label ? `label: ${match.label}` : `id ${match.id}`));
  figure.append(stack, caption);
  item.append(figure);
  return item;
}

async function search() {
  if (!chosenFile) return;
  const body = new FormData();
  body.append("image", chosenFile);
  body.append("k", $("k-input").value || "10");
  const label = $("label-input").value.trim();
  if (label) body.append("label", label);
  body.append("heatmaps", "true");
  button.disabled = true;
  setStatus("Searching…");
  try {
    const response = await fetch("/v1/search", { method: "POST", body });
    const data = await response.json();
    if (!response.ok) {
      const detail = typeof data.detail === "string" ? data.detail
        : (data.detail || []).map((d) => `${(d.loc || []).slice(-1)[0]}: ${d.msg}`).join("; ");
      throw new Error(detail || `HTTP ${response.status}`);
    }
    render(data);
    setStatus(`${data.matches.length} matches.`);
  } catch (error) {
    setStatus(`Search failed: ${error.message}`, true);
  } finally {
    button.disabled = false;
  }
}

function render(data) {
  const figure = $("query-figure");
  const img = $("query-image");
  const canvas = figure.querySelector("canvas.heatmap");
  delete canvas.dataset.drawn;
  figure.hidden = false;
  img.src = queryUrl;
  $("query-caption").textContent =
    `${data.query.width}×${data.query.height} ${data.query.format || ""}`;
  if (data.query.heatmap) {
    whenLoaded(img, () => drawHeatmap(canvas, img, data.query.heatmap, data.crop_fraction));
  }
  results.replaceChildren(...data.matches.map((m) => matchTile(m, data.crop_fraction)));
  const t = data.timings;
  $("timings").textContent = `decode ${t.decode_ms.toFixed(1)} ms · embed ${t.embed_ms.toFixed(1)}`
    + ` ms · search ${t.search_ms.toFixed(1)} ms · total ${t.total_ms.toFixed(1)} ms`;
}

dropZone.addEventListener("click", () => fileInput.click());
dropZone.addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") {
    event.preventDefault();
    fileInput.click();
  }
});
dropZone.addEventListener("dragover", (event) => {
  event.preventDefault();
  dropZone.classList.add("dragging");
});
dropZone.addEventListener("dragleave", () => dropZone.classList.remove("dragging"));
dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  dropZone.classList.remove("dragging");
  choose(event.dataTransfer.files[0]);
});
fileInput.addEventListener("change", () => choose(fileInput.files[0]));
form.addEventListener("submit", (event) => {
  event.preventDefault();
  search();
});
$("opacity-slider").addEventListener("input", (event) => {
  const value = Number(event.target.value);
  document.documentElement.style.setProperty("--heatmap-opacity", String(value));
  $("opacity-value").textContent = value.toFixed(2);
});
$("heatmap-toggle").addEventListener("change", (event) => {
  document.body.classList.toggle("heatmaps-off", !event.target.checked);
});
