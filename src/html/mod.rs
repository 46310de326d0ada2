//! Self-contained static HTML pages: the latent dashboard (`sae latents`,
//! `DIR/index.html`) and the run report (`RUN/report.html`).
//!
//! One file each, no network: inline CSS and JS (the `*.js`/`*.css` files
//! beside this one, compiled in), the data as JSON in a
//! `<script type="application/json" id="data">` block, PNGs as base64
//! `data:` URLs. Pictures (image tiles, histograms, scatter plots) are drawn
//! by the page on `<canvas>` from the embedded numbers. Script errors are
//! written into `#errors` (so a headless browser's DOM shows them).

use serde_json::Value;

const CSS: &str = include_str!("page.css");
const COMMON_JS: &str = include_str!("common.js");
const LATENTS_JS: &str = include_str!("latents.js");
const REPORT_JS: &str = include_str!("report.js");

/// Standard base64 (RFC 4648, with padding).
pub fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= c.len() {
                out.push(T[(n >> shift) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Text for HTML element content or a quoted attribute.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A number rounded to 4 significant digits for embedding (NaN/Inf: null).
pub fn num(x: f64) -> Value {
    if !x.is_finite() {
        return Value::Null;
    }
    let r: f64 = format!("{x:.3e}").parse().unwrap_or(x);
    serde_json::Number::from_f64(r).map_or(Value::Null, Value::Number)
}

/// JSON safe inside `<script>`: `</` cannot end the block.
fn script_json(data: &Value) -> String {
    data.to_string().replace("</", "<\\/")
}

fn page(title: &str, body: &str, data: &Value, js: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title}</title>\n<style>\n{CSS}</style>\n</head>\n<body>\n\
         <pre id=\"errors\" hidden></pre>\n{body}\n\
         <script type=\"application/json\" id=\"data\">{data}</script>\n\
         <script>\n{COMMON_JS}\n{js}</script>\n</body>\n</html>\n",
        title = escape(title),
        data = script_json(data),
    )
}

/// The latent dashboard; `data` as `latents.rs` builds it.
pub fn latents_page(title: &str, data: &Value) -> String {
    let body = r#"<header><h1 id="title"></h1><p id="subtitle"></p></header>
<section class="top">
  <div class="panel"><h2>Run</h2><table id="summary" class="kv"></table></div>
  <div class="panel"><h2>Firing frequency</h2><canvas id="freqhist" width="520" height="220"></canvas>
  <p class="note">Latents by the fraction of rows on which they are active (decades; dead = never).</p></div>
</section>
<section class="main">
  <div class="panel" id="tablepanel">
    <h2>Latents</h2>
    <div class="controls">
      <label>frequency &ge; <input id="fmin" type="number" step="any" min="0" max="1" placeholder="0"></label>
      <label>&le; <input id="fmax" type="number" step="any" min="0" max="1" placeholder="1"></label>
      <label>max act. &ge; <input id="amin" type="number" step="any" placeholder="any"></label>
      <label><select id="fdead"><option value="all">all</option><option value="alive">alive</option><option value="dead">dead only</option></select></label>
      <label>latent <input id="goto" type="number" min="0" placeholder="id"></label>
      <label id="qlabel" hidden>labels contain <input id="q" type="search" placeholder="token or context"></label>
    </div>
    <p><span id="count"></span> latents match; <span id="pageinfo"></span>
      <button id="prev" type="button">&larr;</button><button id="next" type="button">&rarr;</button></p>
    <table id="latents" class="grid"><thead><tr>
      <th data-key="id">id</th><th data-key="freq">frequency</th><th data-key="mean">mean act.</th>
      <th data-key="max">max act.</th><th data-key="norm">decoder norm</th><th data-key="cos">nearest cos</th><th data-key="dead">dead</th><th id="tokhead" class="toks" hidden>top tokens</th>
    </tr></thead><tbody id="rows"></tbody></table>
    <p class="note">Click a column to sort, a row to open its card.</p>
  </div>
  <div class="panel" id="cardpanel"><div id="card"><p class="note">Open a latent from the table (or <code>#latent=N</code> in the address).</p></div></div>
</section>"#;
    page(title, body, data, LATENTS_JS)
}

/// The run report; `data` as `report.rs` builds it.
pub fn report_page(title: &str, data: &Value) -> String {
    let body = r#"<header><h1 id="title"></h1><p id="subtitle"></p></header>
<section class="top">
  <div class="panel"><h2>Metrics</h2><table id="metrics" class="grid"></table><div id="warnings"></div></div>
  <div class="panel"><h2>Latent dashboard</h2><div id="latentlink"></div></div>
</section>
<section class="panel"><h2>Originals and reconstructions</h2><p class="note" id="samplenote"></p><div id="samples"></div></section>
<section class="panel"><h2>The codes in two dimensions</h2><p class="note" id="pcanote"></p><canvas id="pca" width="560" height="460"></canvas><div id="pcalegend"></div></section>
<section class="panel"><h2>Plots</h2><div id="plots"></div></section>
<section class="panel"><h2>Config</h2><pre id="config"></pre></section>"#;
    page(title, body, data, REPORT_JS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn embedded_json_cannot_close_the_script() {
        let v = serde_json::json!({"label": "</script><b>"});
        assert!(!script_json(&v).contains("</"));
        assert_eq!(escape("<a href='x'>&"), "&lt;a href=&#39;x&#39;&gt;&amp;");
        assert_eq!(num(0.000123456), serde_json::json!(0.0001235));
        assert_eq!(num(f64::NAN), Value::Null);
    }
}
