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
      el.querySelectorAll("form[data-confirm]").forEach(guardForm); // new forms ask before acting too
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

// Restore: show the fields of the mode chosen (new VM: name, start; disks: overwrite).
function wireRestoreForm(form) {
  const update = () => {
    const chosen = form.querySelector("input[name=mode]:checked");
    const mode = chosen ? chosen.value : "disks";
    form.querySelectorAll("[data-mode]").forEach((el) => {
      el.hidden = el.getAttribute("data-mode") !== mode;
      el.querySelectorAll("input").forEach((input) => { input.disabled = el.hidden; });
    });
  };
  form.querySelectorAll("input[name=mode]").forEach((radio) => radio.addEventListener("change", update));
  update();
}

// Vault creation: the passphrase's strength by the server's own rules, and whether both fields match.
function wirePassphrase(form) {
  const first = form.querySelector("#passphrase");
  const second = form.querySelector("#passphrase2");
  const out = form.querySelector("#strength");
  if (!first || !second || !out) return;
  let timer = null;
  const check = async () => {
    const body = new FormData();
    body.append("csrf", form.querySelector("input[name=csrf]").value);
    body.append("passphrase", first.value);
    try {
      const response = await fetch("/vaults/passphrase-check", { method: "POST", body, credentials: "same-origin" });
      if (!response.ok) return;
      const verdict = await response.json();
      let text = (verdict.ok ? "Strong enough: " : "Too weak: ") + verdict.message + (verdict.hint && !verdict.ok ? " (" + verdict.hint + ")" : "");
      if (second.value && second.value !== first.value) text += ". The two passphrases differ.";
      out.textContent = text;
      out.className = verdict.ok && (!second.value || second.value === first.value) ? "hint ok" : "hint bad";
    } catch (e) {
      // offline: the server checks again on submit
    }
  };
  const later = () => { clearTimeout(timer); timer = setTimeout(check, 250); };
  first.addEventListener("input", later);
  second.addEventListener("input", later);
}

document.addEventListener("DOMContentLoaded", () => {
  const restore = document.getElementById("restore-form");
  if (restore) wireRestoreForm(restore);
  const create = document.getElementById("vault-create");
  if (create) wirePassphrase(create);
});
