// vmvault portal: the few live parts. Everything else is plain server-rendered HTML.
"use strict";

// [data-live="URL"]: replace the element's content with GET URL every second (live progress
// without reloading the page); stop once the fragment says it is final (data-live-stop).
function startLive(el) {
  const url = el.getAttribute("data-live");
  let busy = false;
  const timer = setInterval(async () => {
    if (busy || document.hidden) return;
    busy = true;
    try {
      const response = await fetch(url, { credentials: "same-origin", headers: { "X-Requested-With": "fetch" } });
      if (response.redirected || !response.ok) return; // signed out or gone: keep what is shown
      el.innerHTML = await response.text();
      if (el.querySelector("[data-live-stop]")) clearInterval(timer);
    } catch (e) {
      // the server restarting: try again on the next tick
    } finally {
      busy = false;
    }
  }, 1000);
}

// form[data-confirm]: ask before destructive actions (stop backup, unmount, delete, cancel).
function guardForm(form) {
  form.addEventListener("submit", (event) => {
    if (!window.confirm(form.getAttribute("data-confirm"))) event.preventDefault();
  });
}

// Enable backup: show only the chosen vault's policies; the new-vault name only for a new vault.
function wireEnableForm(form) {
  const vault = form.querySelector("#vault-select");
  const policy = form.querySelector("#policy-select");
  const newVault = form.querySelector(".new-vault");
  if (!vault || !policy) return;
  const update = () => {
    const chosen = vault.value;
    let first = null;
    for (const option of policy.options) {
      const show = option.dataset.vault === chosen;
      option.hidden = !show;
      option.disabled = !show;
      if (show && first === null) first = option;
    }
    if (policy.selectedOptions.length === 0 || policy.selectedOptions[0].disabled) {
      policy.value = first ? first.value : "";
    }
    policy.closest("label").hidden = chosen === "__new__";
    if (newVault) newVault.hidden = chosen !== "__new__";
  };
  vault.addEventListener("change", update);
  update();
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-live]").forEach(startLive);
  document.querySelectorAll("form[data-confirm]").forEach(guardForm);
  const enable = document.getElementById("enable-form");
  if (enable) wireEnableForm(enable);
  document.querySelectorAll(".toast-close").forEach((button) =>
    button.addEventListener("click", () => button.closest(".toast").remove()),
  );
});
