// GSP image search page: upload a query, show matches, draw heatmaps from the numeric grids.
// Heatmaps are rendered once per image onto a <canvas> (bilinear upscaling + colour map);
// opacity and visibility are CSS, so the slider and the toggle act instantly.
// "Explain" asks /v1/explain which GSP prototypes ("parts") carry a match's score and draws
// each part's maps in its own colour; rectangles drawn on the query re-pool it through
// /v1/search/regions (fractions of the whole uploaded image, which the page shows uncropped).
"use strict";

const $ = (id) => document.getElementById(id);
const form = $("search-form");
const dropZone = $("drop-zone");
const fileInput = $("file-input");
const button = $("search-button");
const status = $("status");
const results = $("results");
const regionCanvas = $("region-canvas");
const regionTools = $("region-tools");
const ratioSlider = $("ratio-slider");
const explainPanel = $("explain-panel");
let chosenFile = null;
let queryUrl = null;
let cropFraction = 1;
let regions = []; // {kind: "favour" | "ignore", box: [x0, y0, x1, y1]} in image fractions
let dragStart = null;
let dragBox = null;
let ratioChosen = false; // the selectivity slider is sent only once the user has moved it
let explainOpener = null;

// Colour map stops (t, r, g, b): dark blue -> blue -> cyan -> yellow -> red.
const STOPS = [
  [0.0, 10, 10, 120], [0.25, 30, 90, 230], [0.5, 40, 200, 220],
  [0.75, 250, 220, 40], [1.0, 220, 30, 30],
];
// One colour per explained part, the same in the query and in the match.
const PART_COLOURS = [
  [230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48],
  [145, 30, 180], [70, 200, 200], [240, 50, 230], [128, 128, 0],
];
const REGION_COLOURS = { favour: [22, 163, 74], ignore: [220, 38, 38] };
const MIN_REGION = 0.01; // rectangles thinner than this fraction are treated as clicks

function colour(t) {
  for (let i = 1; i < STOPS.length; i++) {
    if (t <= STOPS[i][0]) {
      const [t0, r0, g0, b0] = STOPS[i - 1];
      const [t1, r1, g1, b1] = STOPS[i];
      const f = (t - t0) / (t1 - t0 || 1);
      return [r0 + f * (r1 - r0), g0 + f * (g1 - g0), b0 + f * (b1 - b0), 255];
    }
  }
  return [...STOPS[STOPS.length - 1].slice(1), 255];
}

// A single hue whose opacity grows with the value, transparent where the part is absent.
function tint(rgb) {
  return (t) => [rgb[0], rgb[1], rgb[2], 230 * t ** 1.5];
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

// The centred square the network saw (crop_fraction of the short side), in image fractions.
function cropSquare(width, height, fraction) {
  const side = Math.min(width, height) * fraction;
  return {
    left: (width - side) / 2 / width, top: (height - side) / 2 / height,
    width: side / width, height: side / height,
  };
}

// Draw `heatmap.grid` over the crop square; `paint(t)` maps a value in [0, 1] to RGBA.
function drawHeatmap(canvas, img, heatmap, fraction, paint = colour) {
  const grid = heatmap.grid;
  if (!grid.length || !grid[0].length) return;
  const square = cropSquare(img.naturalWidth, img.naturalHeight, fraction);
  canvas.style.left = `${square.left * 100}%`;
  canvas.style.top = `${square.top * 100}%`;
  canvas.style.width = `${square.width * 100}%`;
  canvas.style.height = `${square.height * 100}%`;
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
      const [r, g, b, a] = paint(t);
      const o = (py * size + px) * 4;
      pixels.data[o] = r; pixels.data[o + 1] = g; pixels.data[o + 2] = b; pixels.data[o + 3] = a;
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

// POST a form and return the JSON body, or throw with the service's explanation.
async function postForm(url, body) {
  const response = await fetch(url, { method: "POST", body });
  const data = await response.json();
  if (!response.ok) {
    const detail = typeof data.detail === "string" ? data.detail
      : (data.detail || []).map((d) => `${(d.loc || []).slice(-1)[0]}: ${d.msg}`).join("; ");
    throw new Error(detail || `HTTP ${response.status}`);
  }
  return data;
}

function choose(file) {
  if (!file) return;
  chosenFile = file;
  button.disabled = false;
  if (queryUrl) URL.revokeObjectURL(queryUrl);
  queryUrl = URL.createObjectURL(file);
  $("drop-help").textContent = `Searching with ${file.name}; choose or drop another file to `
    + "search with it instead.";
  regions = [];
  closeExplanation();
  search();
}

function matchTile(match, fraction) {
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
    whenLoaded(img, () => drawHeatmap(canvas, img, match.heatmap, fraction));
  }
  const caption = document.createElement("figcaption");
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = `#${match.rank} · ${match.score.toFixed(3)}`;
  const explain = document.createElement("button");
  explain.type = "button";
  explain.className = "explain-button";
  explain.textContent = "Explain";
  explain.setAttribute("aria-label", `Explain match ${match.rank}`);
  explain.addEventListener("click", () => explainMatch(match, explain));
  caption.append(score, document.createElement("br"),
    document.createTextNode(match.label ? `label: ${match.label}` : `id ${match.id}`),
    document.createElement("br"), explain);
  figure.append(stack, caption);
  item.append(figure);
  return item;
}

function baseForm() {
  const body = new FormData();
  body.append("image", chosenFile);
  body.append("k", $("k-input").value || "10");
  const label = $("label-input").value.trim();
  if (label) body.append("label", label);
  body.append("heatmaps", "true");
  return body;
}

async function runSearch(url, body, describe) {
  button.disabled = true;
  regionTools.disabled = true;
  setStatus("Searching…");
  try {
    const data = await postForm(url, body);
    render(data);
    setStatus(`${data.matches.length} matches${describe}.`);
  } catch (error) {
    setStatus(`Search failed: ${error.message}`, true);
  } finally {
    button.disabled = false;
    regionTools.disabled = false;
  }
}

function search() {
  if (chosenFile) runSearch("/v1/search", baseForm(), "");
}

function regionSearch() {
  if (!chosenFile) return;
  const body = baseForm();
  const spec = { favour: [], ignore: [], units: "fraction" };
  for (const region of regions) spec[region.kind].push(region.box);
  body.append("regions", JSON.stringify(spec));
  if (ratioChosen) body.append("transport_ratio", transportRatio().toFixed(2));
  const ratio = ratioChosen ? `, pooling ${Math.round(transportRatio() * 100)}% of the mass` : "";
  runSearch("/v1/search/regions", body,
    ` with ${spec.favour.length} favoured and ${spec.ignore.length} ignored regions${ratio}`);
}

function render(data) {
  const figure = $("query-figure");
  const img = $("query-image");
  const canvas = figure.querySelector("canvas.heatmap");
  delete canvas.dataset.drawn;
  figure.hidden = false;
  cropFraction = data.crop_fraction;
  img.src = queryUrl;
  $("query-caption").textContent =
    `${data.query.width}×${data.query.height} ${data.query.format || ""}`;
  if (data.query.heatmap) {
    whenLoaded(img, () => drawHeatmap(canvas, img, data.query.heatmap, data.crop_fraction));
  }
  whenLoaded(img, drawRegions);
  results.replaceChildren(...data.matches.map((m) => matchTile(m, data.crop_fraction)));
  const t = data.timings;
  $("timings").textContent = `decode ${t.decode_ms.toFixed(1)} ms · embed ${t.embed_ms.toFixed(1)}`
    + ` ms · search ${t.search_ms.toFixed(1)} ms · total ${t.total_ms.toFixed(1)} ms`;
}

// -- explanations --------------------------------------------------------------------------

function partStack(src, alt, heatmap, rgb, side) {
  const stack = document.createElement("div");
  stack.className = "stack";
  const img = document.createElement("img");
  img.src = src;
  img.alt = alt;
  const canvas = document.createElement("canvas");
  canvas.className = "part-map";
  canvas.dataset.side = side;
  canvas.setAttribute("aria-hidden", "true");
  stack.append(img, canvas);
  whenLoaded(img, () => drawHeatmap(canvas, img, heatmap, cropFraction, tint(rgb)));
  return stack;
}

function partItem(part, index, match) {
  const rgb = PART_COLOURS[index % PART_COLOURS.length];
  const item = document.createElement("li");
  const figure = document.createElement("figure");
  figure.className = "tile part";
  figure.style.setProperty("--part-colour", `rgb(${rgb.join(",")})`);
  const pair = document.createElement("div");
  pair.className = "pair";
  pair.append(
    partStack(queryUrl, `Query, part ${part.prototype}`, part.query, rgb, "query"),
    partStack(match.thumbnail_url, `Match, part ${part.prototype}`, part.match, rgb, "match"),
  );
  const caption = document.createElement("figcaption");
  const swatch = document.createElement("span");
  swatch.className = "swatch";
  swatch.setAttribute("aria-hidden", "true");
  const percent = part.share * 100;
  const share = `${percent.toFixed(Math.abs(percent) < 10 ? 1 : 0)}% of score`;
  caption.append(swatch, document.createTextNode(`part ${part.prototype} · ${share}`));
  figure.append(pair, caption);
  item.append(figure);
  return item;
}

async function explainMatch(match, opener) {
  if (!chosenFile) return;
  const body = new FormData();
  body.append("image", chosenFile);
  body.append("gallery_id", String(match.id));
  body.append("top", "3");
  body.append("overlays", "false"); // the page draws from the grids
  opener.disabled = true;
  setStatus(`Explaining match ${match.rank}…`);
  try {
    const data = await postForm("/v1/explain", body);
    cropFraction = data.crop_fraction;
    const shown = data.prototypes.reduce((sum, part) => sum + part.share, 0);
    $("explain-summary").textContent = `Match #${match.rank}`
      + `${match.label ? ` (label ${match.label})` : ""}: similarity ${data.score.toFixed(3)};`
      + ` the ${data.prototypes.length} parts below carry ${(shown * 100).toFixed(0)}% of it.`;
    $("explain-parts").replaceChildren(
      ...data.prototypes.map((part, index) => partItem(part, index, match)));
    explainPanel.hidden = false;
    explainOpener = opener;
    $("explain-title").focus();
    setStatus(`Explained match ${match.rank}.`);
  } catch (error) {
    setStatus(`Explain failed: ${error.message}`, true);
  } finally {
    opener.disabled = false;
  }
}

function closeExplanation() {
  if (explainPanel.hidden) return;
  explainPanel.hidden = true;
  $("explain-parts").replaceChildren();
  if (explainOpener && explainOpener.isConnected) explainOpener.focus();
  explainOpener = null;
}

// -- regions -------------------------------------------------------------------------------

function regionMode() {
  return document.querySelector('input[name="region-mode"]:checked').value;
}

function transportRatio() {
  return 1 - Number(ratioSlider.value);
}

// Pointer position as fractions of the displayed query image (which shows the whole upload).
function fractionAt(event) {
  const box = $("query-image").getBoundingClientRect();
  const clamp = (v) => Math.min(Math.max(v, 0), 1);
  const x = (event.clientX - box.left) / box.width;
  const y = (event.clientY - box.top) / box.height;
  return [clamp(x), clamp(y)];
}

function boxFrom(a, b) {
  return [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
}

function strokeBox(ctx, box, rgb, dashed) {
  const w = regionCanvas.width, h = regionCanvas.height;
  const [x0, y0, x1, y1] = [box[0] * w, box[1] * h, box[2] * w, box[3] * h];
  ctx.fillStyle = `rgba(${rgb.join(",")}, 0.18)`;
  ctx.fillRect(x0, y0, x1 - x0, y1 - y0);
  ctx.setLineDash(dashed ? [6, 4] : []);
  ctx.strokeStyle = `rgb(${rgb.join(",")})`;
  ctx.lineWidth = 3;
  ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
}

function drawRegions() {
  const img = $("query-image");
  if (!img.naturalWidth) return;
  const scale = Math.min(1, 1024 / Math.max(img.naturalWidth, img.naturalHeight));
  regionCanvas.width = Math.round(img.naturalWidth * scale);
  regionCanvas.height = Math.round(img.naturalHeight * scale);
  const ctx = regionCanvas.getContext("2d");
  ctx.clearRect(0, 0, regionCanvas.width, regionCanvas.height);
  const square = cropSquare(img.naturalWidth, img.naturalHeight, cropFraction);
  ctx.setLineDash([4, 4]);
  ctx.strokeStyle = "rgba(255, 255, 255, 0.9)";
  ctx.lineWidth = 2;
  ctx.strokeRect(square.left * regionCanvas.width, square.top * regionCanvas.height,
    square.width * regionCanvas.width, square.height * regionCanvas.height);
  for (const region of regions) strokeBox(ctx, region.box, REGION_COLOURS[region.kind], false);
  if (dragBox) strokeBox(ctx, dragBox, REGION_COLOURS[regionMode()], true);
  const favour = regions.filter((r) => r.kind === "favour").length;
  $("region-count").textContent = regions.length
    ? `${favour} favoured, ${regions.length - favour} ignored` : "No regions";
  regionCanvas.dataset.regions = String(regions.length);
}

regionCanvas.addEventListener("pointerdown", (event) => {
  if (regionTools.disabled || event.button !== 0) return;
  event.preventDefault();
  regionCanvas.setPointerCapture(event.pointerId);
  dragStart = fractionAt(event);
  dragBox = null;
});
regionCanvas.addEventListener("pointermove", (event) => {
  if (!dragStart) return;
  dragBox = boxFrom(dragStart, fractionAt(event));
  drawRegions();
});
function endDrag(event) {
  if (!dragStart) return;
  const box = boxFrom(dragStart, fractionAt(event));
  dragStart = null;
  dragBox = null;
  const big = box[2] - box[0] >= MIN_REGION && box[3] - box[1] >= MIN_REGION;
  if (event.type === "pointerup" && big) regions.push({ kind: regionMode(), box });
  drawRegions();
}
regionCanvas.addEventListener("pointerup", endDrag);
regionCanvas.addEventListener("pointercancel", endDrag);

$("clear-regions").addEventListener("click", () => {
  regions = [];
  drawRegions();
});
$("region-search").addEventListener("click", regionSearch);
ratioSlider.addEventListener("input", () => {
  ratioChosen = true;
  $("ratio-value").textContent = `pools ${Math.round(transportRatio() * 100)}% of the mass`;
});
ratioSlider.addEventListener("change", regionSearch);
$("explain-close").addEventListener("click", closeExplanation);
explainPanel.addEventListener("keydown", (event) => {
  if (event.key === "Escape") closeExplanation();
});

// -- query input ---------------------------------------------------------------------------

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
