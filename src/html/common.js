"use strict";
// Errors show on the page (#errors), so a headless browser's DOM reveals them.
function showError(msg) {
  const e = document.getElementById("errors");
  if (e) { e.hidden = false; e.textContent += msg + "\n"; }
}
window.onerror = function (msg, src, line, col) { showError(msg + " (line " + line + ":" + col + ")"); };
window.addEventListener("unhandledrejection", function (ev) { showError("unhandled rejection: " + ev.reason); });

const D = JSON.parse(document.getElementById("data").textContent);

function el(tag, attrs, children) {
  const e = document.createElement(tag);
  for (const k in attrs || {}) {
    if (k === "text") e.textContent = attrs[k];
    else if (k === "cls") e.className = attrs[k];
    else e.setAttribute(k, attrs[k]);
  }
  for (const c of children || []) if (c != null) e.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
  return e;
}

function fmt(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return "\u2013";
  if (x === 0) return "0";
  const a = Math.abs(x);
  if (a < 1e-3 || a >= 1e5) return x.toExponential(2);
  return String(Number(x.toPrecision(3)));
}

function b64bytes(s) {
  const bin = atob(s);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

// Grey tile of `h x w` values in [0, 255] (Uint8Array), `scale` px per cell.
function greyTile(bytes, h, w, scale) {
  const c = el("canvas", { width: w * scale, height: h * scale });
  const ctx = c.getContext("2d");
  const img = ctx.createImageData(w, h);
  for (let i = 0; i < h * w; i++) {
    const v = 255 - bytes[i];
    img.data[4 * i] = v; img.data[4 * i + 1] = v; img.data[4 * i + 2] = v; img.data[4 * i + 3] = 255;
  }
  drawScaled(ctx, img, w, h, scale);
  return c;
}

// Diverging tile (red +, blue -) of signed values scaled to [-1, 1].
function divergingTile(vals, h, w, scale) {
  const c = el("canvas", { width: w * scale, height: h * scale });
  const ctx = c.getContext("2d");
  const img = ctx.createImageData(w, h);
  for (let i = 0; i < h * w; i++) {
    const a = Math.max(-1, Math.min(1, vals[i]));
    const r = a >= 0 ? 255 : Math.round(255 * (1 + a));
    const g = Math.round(255 * (1 - Math.abs(a)));
    const b = a >= 0 ? Math.round(255 * (1 - a)) : 255;
    img.data[4 * i] = r; img.data[4 * i + 1] = g; img.data[4 * i + 2] = b; img.data[4 * i + 3] = 255;
  }
  drawScaled(ctx, img, w, h, scale);
  return c;
}

function drawScaled(ctx, img, w, h, scale) {
  const tmp = document.createElement("canvas");
  tmp.width = w; tmp.height = h;
  tmp.getContext("2d").putImageData(img, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(tmp, 0, 0, w * scale, h * scale);
}

// Bar chart of `counts` with category `labels` on a canvas.
function barChart(canvas, labels, counts, color) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, L = 44, B = 34, T = 10;
  ctx.clearRect(0, 0, W, H);
  const max = Math.max(1, ...counts);
  const bw = (W - L - 10) / Math.max(1, counts.length);
  ctx.font = "11px sans-serif";
  ctx.fillStyle = "#333";
  ctx.strokeStyle = "#999";
  ctx.beginPath(); ctx.moveTo(L, T); ctx.lineTo(L, H - B); ctx.lineTo(W - 5, H - B); ctx.stroke();
  ctx.textAlign = "right";
  ctx.fillText(String(max), L - 4, T + 8);
  ctx.fillText("0", L - 4, H - B);
  for (let i = 0; i < counts.length; i++) {
    const bh = (H - B - T) * counts[i] / max;
    ctx.fillStyle = color || "#4a78c2";
    ctx.fillRect(L + i * bw + 2, H - B - bh, Math.max(1, bw - 4), bh);
    ctx.fillStyle = "#333";
    ctx.textAlign = "center";
    if (i % Math.max(1, Math.ceil(44 / bw)) === 0) ctx.fillText(labels[i], L + (i + 0.5) * bw, H - B + 14);
    if (counts.length <= 12 && counts[i] > 0) ctx.fillText(String(counts[i]), L + (i + 0.5) * bw, H - B - bh - 3);
  }
}

// A categorical colour for integer `i`.
function colour(i) {
  const golden = 0.618033988749895;
  const h = ((i * golden) % 1) * 360;
  return "hsl(" + h.toFixed(0) + ", 70%, 45%)";
}
