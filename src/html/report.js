// The run report: metrics, warnings, originals vs reconstructions, a PCA
// map of the codes, the run's plots and its config.
document.getElementById("title").textContent = D.title;
document.getElementById("subtitle").textContent = D.subtitle;

(function metrics() {
  const S = D.summary || {};
  const t = document.getElementById("metrics");
  // Columns: train, valid, and with eval.encoder the same with that pursuit.
  const cols = ["train", "valid"].filter((s) => S[s]).map((s) => [s, S[s]]);
  const P = S.pursuit;
  if (P) for (const s of ["train", "valid"]) if (P[s]) cols.push([s + " (" + P.encoder + ", k " + P.k + ")", P[s]]);
  t.appendChild(el("tr", {}, [el("th", { text: "metric" })].concat(cols.map((c) => el("th", { text: c[0] })))));
  for (const k of ["mse", "fvu", "explained_variance", "l0", "l1", "dead_fraction", "dense_fraction", "mmcs"]) {
    if (!cols.some((c) => c[1][k] !== undefined)) continue;
    t.appendChild(el("tr", {}, [el("td", { text: k })].concat(cols.map((c) => el("td", { text: fmt(c[1][k]) })))));
  }
  for (const k of ["steps", "epochs", "seconds", "samples_per_second", "device", "world_size"]) {
    if (S[k] === undefined) continue;
    t.appendChild(el("tr", {}, [el("td", { text: k }), el("td", { text: typeof S[k] === "number" ? fmt(S[k]) : String(S[k]) })]));
  }
  const w = document.getElementById("warnings");
  for (const msg of S.warnings || []) w.appendChild(el("p", { cls: "dead-flag", text: "warning: " + msg }));
})();

(function latentLink() {
  const L = D.latents, box = document.getElementById("latentlink");
  if (L.exists) box.appendChild(el("p", {}, [el("a", { href: L.href, text: "Open the latent dashboard" })]));
  box.appendChild(el("p", { cls: "note", text: (L.exists ? "Made with" : "Make it with") + " (then it opens from here):" }));
  box.appendChild(el("pre", { text: L.command }));
  if (!L.exists) box.appendChild(el("p", {}, [el("a", { href: L.href, text: "latents/index.html" })]));
})();

(function samples() {
  const S = D.sample, box = document.getElementById("samples");
  document.getElementById("samplenote").textContent = S.orig.length + " " + S.split + " rows: " +
    (S.image ? "original above, reconstruction below" : "original in grey, reconstruction in colour");
  if (S.image) {
    const [h, w] = S.image;
    let lo = Infinity, hi = -Infinity;
    for (const r of S.orig) for (const v of r) { if (v !== null) { lo = Math.min(lo, v); hi = Math.max(hi, v); } }
    const span = Math.max(hi - lo, 1e-12), scale = Math.max(2, Math.min(8, Math.floor(80 / Math.max(h, w))));
    const bytes = (r) => Uint8Array.from(r, (v) => Math.round(255 * Math.max(0, Math.min(1, ((v === null ? lo : v) - lo) / span))));
    const grid = el("div", { cls: "tiles" });
    S.orig.forEach((r, i) => grid.appendChild(el("div", { cls: "tile sample" }, [greyTile(bytes(r), h, w, scale), greyTile(bytes(S.recon[i]), h, w, scale), el("span", { text: "row " + S.rows[i] })])));
    box.appendChild(grid);
  } else {
    const grid = el("div", { cls: "tiles" });
    S.orig.forEach((r, i) => {
      const c = el("canvas", { width: 300, height: 120 });
      linePlot(c, r, S.recon[i], colour(i));
      grid.appendChild(el("div", { cls: "tile sample" }, [c, el("span", { text: "row " + S.rows[i] })]));
    });
    box.appendChild(grid);
  }
})();

function linePlot(c, a, b, col) {
  const ctx = c.getContext("2d"), W = c.width, H = c.height, P = 6;
  const all = a.concat(b).filter((v) => v !== null);
  const lo = Math.min(...all), hi = Math.max(...all), span = Math.max(hi - lo, 1e-12);
  const X = (i) => P + (W - 2 * P) * i / Math.max(1, a.length - 1), Y = (v) => H - P - (H - 2 * P) * ((v === null ? lo : v) - lo) / span;
  ctx.strokeStyle = "#eee"; ctx.strokeRect(0.5, 0.5, W - 1, H - 1);
  for (const [vals, stroke, width] of [[a, "#888", 2.5], [b, col, 1.2]]) {
    ctx.strokeStyle = stroke; ctx.lineWidth = width; ctx.beginPath();
    vals.forEach((v, i) => (i ? ctx.lineTo(X(i), Y(v)) : ctx.moveTo(X(i), Y(v))));
    ctx.stroke();
  }
}

(function pca() {
  const P = D.pca, c = document.getElementById("pca"), ctx = c.getContext("2d");
  const n = P.latent.length, W = c.width, H = c.height, M = 30;
  document.getElementById("pcanote").textContent = "First two principal components of the codes of " + n + " " + P.split +
    " rows; each point coloured by its strongest latent (grey: no active latent).";
  const xs = [], ys = [];
  for (let i = 0; i < n; i++) { xs.push(P.xy[2 * i] || 0); ys.push(P.xy[2 * i + 1] || 0); }
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  const sx = (v) => M + (W - 2 * M) * (v - x0) / Math.max(x1 - x0, 1e-12), sy = (v) => H - M - (H - 2 * M) * (v - y0) / Math.max(y1 - y0, 1e-12);
  ctx.strokeStyle = "#999"; ctx.strokeRect(M - 6, M - 6, W - 2 * M + 12, H - 2 * M + 12);
  ctx.fillStyle = "#333"; ctx.font = "12px sans-serif"; ctx.fillText("PC 1", W / 2, H - 6); ctx.save(); ctx.translate(12, H / 2); ctx.rotate(-Math.PI / 2); ctx.fillText("PC 2", 0, 0); ctx.restore();
  const count = {};
  for (let i = 0; i < n; i++) {
    const j = P.latent[i];
    count[j] = (count[j] || 0) + 1;
    ctx.fillStyle = j < 0 ? "#bbb" : colour(j);
    ctx.globalAlpha = 0.75;
    ctx.beginPath(); ctx.arc(sx(xs[i]), sy(ys[i]), 2.6, 0, 2 * Math.PI); ctx.fill();
  }
  ctx.globalAlpha = 1;
  const common = Object.keys(count).map(Number).filter((j) => j >= 0).sort((a, b) => count[b] - count[a] || a - b).slice(0, 12);
  const legend = el("div", { cls: "legend" });
  for (const j of common) legend.appendChild(el("span", {}, [el("i", { style: "background:" + colour(j) }), "latent " + j + " (" + count[j] + ")"]));
  document.getElementById("pcalegend").appendChild(legend);
})();

(function plots() {
  const box = document.getElementById("plots");
  for (const [name, src] of D.plots) box.appendChild(el("img", { src: src, alt: name, title: name }));
  document.getElementById("config").textContent = D.config;
})();
document.body.dataset.readyMs = performance.now().toFixed(0);
document.body.dataset.ready = "1";
