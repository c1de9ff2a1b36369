// The analytics dashboard: polls /api/summary and draws it. Every string from the
// server (user ids and product names come from events) is written with textContent or
// setAttribute, never parsed as markup.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const KINDS = [
    ["clicks", "clicks"],
    ["purchases", "purchases"],
    ["logins", "logins"],
  ];
  const ACTIVE = [["active_users", "active users"]];
  const byId = (id) => document.getElementById(id);
  let updates = 0;

  // 12345 -> "12,345", the grouping `workers stats` uses for money.
  function count(n) {
    return Number(n).toLocaleString("en-US");
  }

  // A number shown as text, its exact value in data-value (what tests read).
  function setNumber(id, n) {
    const el = byId(id);
    el.textContent = count(n);
    el.dataset.value = String(n);
  }

  function element(tag, className, text) {
    const el = document.createElement(tag);
    if (className) el.className = className;
    if (text !== undefined) el.textContent = String(text);
    return el;
  }

  function svg(tag, attributes, text) {
    const el = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attributes)) {
      el.setAttribute(name, String(value));
    }
    if (text !== undefined) el.textContent = String(text);
    return el;
  }

  // The smallest 1, 2 or 5 times a power of ten at or above n (at least 1).
  function axisMax(n) {
    if (n <= 1) return 1;
    const power = Math.pow(10, Math.floor(Math.log10(n)));
    for (const step of [1, 2, 5, 10]) {
      if (step * power >= n) return step * power;
    }
    return 10 * power;
  }

  // Stacked bars, one per minute, one segment per series; a <g class="minute"> per
  // minute carries its numbers (data-*) and a tooltip. Drawn in the element's own pixel
  // size, so text keeps its size whatever the window's width.
  function drawBars(target, minutes, series) {
    const box = { width: Math.max(200, target.clientWidth), height: Math.max(80, target.clientHeight) };
    target.setAttribute("viewBox", "0 0 " + box.width + " " + box.height);
    const [left, right, top, bottom] = [44, 8, 8, 22];
    const width = box.width - left - right;
    const height = box.height - top - bottom;
    const total = (m) => series.reduce((sum, [key]) => sum + m[key], 0);
    const max = axisMax(Math.max(0, ...minutes.map(total)));
    const slot = width / Math.max(1, minutes.length);
    const barWidth = Math.max(1, slot * 0.8);
    const parts = [];
    for (const fraction of max % 2 === 0 ? [0, 0.5, 1] : [0, 1]) {
      const y = top + height - fraction * height;
      parts.push(svg("line", { class: "axis", x1: left, x2: left + width, y1: y, y2: y }));
      parts.push(svg("text", { class: "tick", x: left - 6, y: y + 4, "text-anchor": "end" }, count(max * fraction)));
    }
    minutes.forEach((m, i) => {
      const x = left + i * slot + (slot - barWidth) / 2;
      const group = svg("g", { class: "minute", "data-minute": m.minute, "data-label": m.label });
      const tip = [m.label + " UTC"];
      let base = top + height;
      for (const [key, name] of series) {
        group.setAttribute("data-" + key.replace("_", "-"), m[key]);
        tip.push(count(m[key]) + " " + name);
        if (m[key] > 0) {
          const h = (m[key] / max) * height;
          base -= h;
          group.appendChild(svg("rect", { class: key, x: x, y: base, width: barWidth, height: h }));
        }
      }
      group.appendChild(svg("title", {}, tip.join(", ")));
      parts.push(group);
      const last = i === minutes.length - 1;
      if (last || (m.minute % 10 === 0 && minutes.length - 1 - i >= 4)) {
        parts.push(svg("text", { class: "tick", x: x + barWidth / 2, y: box.height - 6, "text-anchor": "middle" }, m.label));
      }
    });
    target.replaceChildren(...parts);
  }

  function fillTable(id, rows, cells, empty) {
    const body = byId(id).tBodies[0];
    if (rows.length === 0) {
      const row = element("tr");
      const cell = element("td", "empty", empty);
      cell.colSpan = byId(id).tHead.rows[0].cells.length;
      row.appendChild(cell);
      body.replaceChildren(row);
      return;
    }
    body.replaceChildren(
      ...rows.map((r) => {
        const row = element("tr");
        for (const [className, text] of cells(r)) row.appendChild(element("td", className, text));
        return row;
      })
    );
  }

  function render(s) {
    const t = s.totals;
    setNumber("total-clicks", t.clicks);
    setNumber("total-purchases", t.purchases);
    setNumber("total-logins", t.logins);
    setNumber("failed-logins", t.failed_logins);
    setNumber("flagged-count", s.flagged_count);
    setNumber("active-users", s.active_users);
    const revenue = byId("revenue");
    revenue.textContent = t.revenue;
    revenue.dataset.value = String(t.revenue_cents);
    byId("revenue-window").textContent = s.window_revenue;
    for (const el of document.querySelectorAll(".window-minutes")) el.textContent = String(s.minutes.length);
    byId("flag-threshold").textContent = String(s.flag_threshold);

    drawBars(byId("events-chart"), s.minutes, KINDS);
    drawBars(byId("active-chart"), s.minutes, ACTIVE);

    fillTable("top-products", s.top_products, (p) => [
      ["name", p.name],
      ["num purchases", count(p.purchases)],
      ["num revenue", p.revenue],
    ], "no purchases yet");
    fillTable("failing-users", s.failing_users, (u) => [
      ["user", u.user],
      ["num failed", count(u.failed_logins)],
      [u.flagged ? "flag" : "", u.flagged ? "flagged" : ""],
    ], "no failed logins");

    const flagged = byId("flagged");
    if (s.flagged.length === 0) {
      flagged.replaceChildren(element("li", "empty", "nobody"));
    } else {
      flagged.replaceChildren(...s.flagged.map((user) => element("li", "user", user)));
    }
    const more = s.flagged_count - s.flagged.length;
    byId("flagged-more").textContent = more > 0 ? "and " + count(more) + " more" : "";

    updates += 1;
    document.body.dataset.updates = String(updates);
    document.body.dataset.readAt = String(s.read_at_ms);
    const status = byId("status");
    status.className = "";
    const at = new Date(s.read_at_ms).toISOString().slice(11, 19);
    status.textContent = "updated " + at + " UTC" + (s.pending > 0 ? " · " + count(s.pending) + " events being counted" : "");
  }

  function showError(message) {
    const status = byId("status");
    status.className = "error";
    status.textContent = "cannot update: " + message + " (retrying)";
  }

  async function poll() {
    let delay = 2000;
    try {
      const response = await fetch("/api/summary", { cache: "no-store", headers: { accept: "application/json" } });
      const body = await response.json();
      if (!response.ok) throw new Error(body.error || "HTTP " + response.status);
      render(body);
      delay = body.refresh_ms;
    } catch (e) {
      showError(e.message || String(e));
    }
    setTimeout(poll, delay);
  }

  poll();
})();
