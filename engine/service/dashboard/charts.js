// Line charts as plain SVG: a zero-based y axis, a time x axis, gaps where a value is null.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";

function svgEl(name, attrs, text) {
  const el = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

// The smallest "nice" number (1, 2, 5 x 10^n) at or above x.
function niceCeil(x) {
  if (!(x > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(x)));
  for (const m of [1, 2, 5, 10]) if (m * p >= x) return m * p;
  return 10 * p;
}

function shortNumber(v) {
  if (v >= 1e6) return (v / 1e6).toFixed(v >= 1e7 ? 0 : 1) + "M";
  if (v >= 1e3) return (v / 1e3).toFixed(v >= 1e4 ? 0 : 1) + "k";
  if (v >= 10 || v === 0) return v.toFixed(0);
  return v.toPrecision(2);
}

// series: [{name, color, points: [[t_seconds, value_or_null], ...]}]; windowS: x span.
function drawLineChart(svg, series, windowS) {
  const W = 600, H = 220, L = 48, R = 10, T = 22, B = 22;
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  let tMax = 0, yMax = 0;
  for (const s of series) for (const [t, v] of s.points) {
    tMax = Math.max(tMax, t);
    if (v !== null && Number.isFinite(v)) yMax = Math.max(yMax, v);
  }
  const tMin = tMax - windowS;
  yMax = niceCeil(yMax * 1.05);
  const x = (t) => L + ((t - tMin) / windowS) * (W - L - R);
  const y = (v) => T + (1 - v / yMax) * (H - T - B);
  const steps = String(yMax)[0] === "2" ? 4 : 5;  // 0.5, 1 or 2 x 10^n between lines
  for (let i = 0; i <= steps; i++) {
    const v = (yMax * i) / steps;
    svg.appendChild(svgEl("line", { class: i ? "grid" : "axis", x1: L, x2: W - R, y1: y(v), y2: y(v) }));
    svg.appendChild(svgEl("text", { x: L - 4, y: y(v) + 3, "text-anchor": "end" }, shortNumber(v)));
  }
  const minutes = windowS / 60;
  for (let m = 0; m <= minutes; m += minutes > 5 ? 2 : 1) {
    const t = tMax - m * 60;
    svg.appendChild(svgEl("text", { x: x(t), y: H - 6, "text-anchor": "middle" }, m ? `-${m}m` : "now"));
  }
  let lx = L + 4;
  for (const s of series) {
    let d = "";
    const ok = (p) => p && p[0] >= tMin && p[1] !== null && Number.isFinite(p[1]);
    s.points.forEach((p, i) => {
      if (!ok(p)) return;
      const prev = ok(s.points[i - 1]), next = ok(s.points[i + 1]);
      d += `${prev ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`;
      if (!prev && !next) {  // a lone value between gaps: a dot, not an invisible line
        svg.appendChild(svgEl("circle", { cx: x(p[0]), cy: y(p[1]), r: 2.5, fill: s.color }));
      }
    });
    if (d) svg.appendChild(svgEl("path", { class: "series", d, stroke: s.color }));
    svg.appendChild(svgEl("rect", { x: lx, y: 6, width: 10, height: 4, fill: s.color }));
    const label = svgEl("text", { x: lx + 14, y: 11 }, s.name);
    svg.appendChild(label);
    lx += 22 + s.name.length * 6;
  }
}

window.RingwayCharts = { drawLineChart };
