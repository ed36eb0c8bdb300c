// Keyboard shortcuts and kept rationales for the judging page. Loaded from this origin only (the CSP forbids
// inline script). A / Left arrow = A better, B / Right arrow = B better, T = tie, X = both bad, 1-3 = strength,
// S = skip, U = undo the last judgment.
(function () {
  "use strict";
  var form = document.getElementById("judge-form");
  var undo = document.getElementById("undo-form");
  var buttons = {
    a: "choose-left", arrowleft: "choose-left",
    b: "choose-right", arrowright: "choose-right",
    t: "choose-tie", x: "choose-both-bad", s: "skip"
  };
  var submitted = false;
  function once(event) {
    // One submission per page: a double click or a held key must not send the judgment twice.
    if (submitted) { event.preventDefault(); }
    submitted = true;
  }
  if (form) { form.addEventListener("submit", once); }
  if (undo) { undo.addEventListener("submit", once); }

  // The typed rationale survives a failed submission (an error page, a sign-in after the session ended): it is
  // kept per assignment for this tab and put back when the same pair is shown again. Other pairs' are dropped.
  var box = document.getElementById("rationale");
  if (form && box) {
    var key = "rlhf-rationale:" + form.dataset.assignment;
    try {
      for (var i = sessionStorage.length - 1; i >= 0; i--) {
        var k = sessionStorage.key(i);
        if (k && k.indexOf("rlhf-rationale:") === 0 && k !== key) { sessionStorage.removeItem(k); }
      }
      if (!box.value) { box.value = sessionStorage.getItem(key) || ""; }
      box.addEventListener("input", function () { sessionStorage.setItem(key, box.value); });
    } catch (e) { /* storage disabled: nothing is kept */ }
  }

  document.addEventListener("keydown", function (event) {
    var target = event.target;
    if (event.ctrlKey || event.metaKey || event.altKey || submitted) { return; }
    if (target && (target.tagName === "TEXTAREA" || (target.tagName === "INPUT" && target.type !== "radio"))) { return; }
    var key = event.key.toLowerCase();
    if (key === "u" && undo) {
      event.preventDefault();
      undo.requestSubmit();
      return;
    }
    if (!form) { return; }
    if (key === "1" || key === "2" || key === "3") {
      var radio = form.querySelector('input[name="strength"][value="' + key + '"]');
      if (radio) { radio.checked = true; event.preventDefault(); }
      return;
    }
    var id = buttons[key];
    if (!id) { return; }
    event.preventDefault();
    form.requestSubmit(document.getElementById(id));
  });
  if (form) { form.dataset.shortcuts = "on"; }  // lets tests (and styles) know the keys are live
})();
