{{/*
Chart name, overridable with nameOverride.
*/}}
{{- define "celery-events-exporter.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name (63 chars max: some Kubernetes name fields are
limited to this by the DNS naming spec). When the release name already
contains the chart name it is used as is.
*/}}
{{- define "celery-events-exporter.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, as used by the helm.sh/chart label.
*/}}
{{- define "celery-events-exporter.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels. These are immutable on a Deployment, so nothing that changes
between releases (chart or app version) may appear here.
*/}}
{{- define "celery-events-exporter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "celery-events-exporter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- with .Values.exporterName }}
celery-events-exporter/broker: {{ . }}
{{- end }}
{{- end }}

{{/*
Common labels: the selector labels plus the version-like and ownership labels.
*/}}
{{- define "celery-events-exporter.labels" -}}
helm.sh/chart: {{ include "celery-events-exporter.chart" . }}
{{ include "celery-events-exporter.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
{{- end }}
app.kubernetes.io/component: exporter
app.kubernetes.io/part-of: celery
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Name of the ServiceAccount to use.
*/}}
{{- define "celery-events-exporter.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "celery-events-exporter.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Container image reference: a digest wins over a tag; the tag defaults to the
chart's appVersion.
*/}}
{{- define "celery-events-exporter.image" -}}
{{- $repo := .Values.image.repository }}
{{- if .Values.image.registry }}
{{- $repo = printf "%s/%s" .Values.image.registry .Values.image.repository }}
{{- end }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repo .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repo (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
Name of the Secret holding the broker URL, and the key inside it.
Empty when no broker is configured.
*/}}
{{- define "celery-events-exporter.brokerSecretName" -}}
{{- if .Values.broker.existingSecret }}
{{- .Values.broker.existingSecret }}
{{- else if .Values.broker.url }}
{{- printf "%s-broker" (include "celery-events-exporter.exporterFullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "celery-events-exporter.brokerSecretKey" -}}
{{- if .Values.broker.existingSecret }}
{{- .Values.broker.existingSecretKey | default "broker-url" }}
{{- else }}
{{- print "broker-url" }}
{{- end }}
{{- end }}

{{/*
The port the daemon listens on: config.port when set, else the daemon's default.
*/}}
{{- define "celery-events-exporter.containerPort" -}}
{{- .Values.config.port | default 9808 | int }}
{{- end }}

{{/*
The daemon's config file: values.config, plus otlp_traces turned on when the
otel block is enabled and config does not say otherwise.
*/}}
{{- define "celery-events-exporter.configData" -}}
{{- $config := deepCopy (.Values.config | default dict) }}
{{- if and .Values.otel.enabled (not (hasKey $config "otlp_traces")) }}
{{- $_ := set $config "otlp_traces" true }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/*
Sanity checks that a JSON schema cannot express well.
*/}}
{{- define "celery-events-exporter.validate" -}}
{{- if and .Values.broker.url .Values.broker.existingSecret }}
{{- fail "set either broker.url or broker.existingSecret, not both" }}
{{- end }}
{{- if hasKey (.Values.config | default dict) "broker_url" }}
{{- fail "config.broker_url is not allowed: the broker URL is a secret, set broker.url or broker.existingSecret" }}
{{- end }}
{{- end }}

{{/*
The values of each exporter to run, as a YAML list: one per entry of brokers
(its own broker; its config over the shared one, key by key, with the static
label broker=<name>; and exporterName), or the chart's values as they are
when brokers is empty. A template ranges over them with a root context of its
own (dict "Values" it "Release" $.Release "Chart" $.Chart "Capabilities"
$.Capabilities), so it reads one exporter's settings the same way in both
cases. Two brokers of the same name fail the rendering.
*/}}
{{- define "celery-events-exporter.exporters" -}}
{{- if and .Values.brokers (or .Values.broker.url .Values.broker.existingSecret) }}
{{- fail "set either broker (one broker) or brokers (several), not both" }}
{{- end }}
{{- $exporters := list }}
{{- $seen := dict }}
{{- range .Values.brokers }}
{{- if hasKey $seen .name }}
{{- fail (printf "brokers: the name %q is given twice: each broker needs a name of its own" .name) }}
{{- end }}
{{- $_ := set $seen .name true }}
{{- $values := deepCopy $.Values }}
{{- $config := deepCopy ($.Values.config | default dict) }}
{{- range $key, $value := .config }}
{{- $_ := set $config $key $value }}
{{- end }}
{{- $_ := set $config "static_labels" (mergeOverwrite (deepCopy ($config.static_labels | default dict)) (dict "broker" .name)) }}
{{- $_ := set $values "config" $config }}
{{- $_ := set $values "broker" (dict "url" (.url | default "") "existingSecret" (.existingSecret | default "") "existingSecretKey" (.existingSecretKey | default "broker-url")) }}
{{- $_ := set $values "exporterName" .name }}
{{- $exporters = append $exporters $values }}
{{- end }}
{{- toYaml (default (list .Values) $exporters) }}
{{- end }}

{{/*
Name of one exporter's Deployment, ConfigMap and broker Secret: the fullname,
then the broker's name when the release runs several.
*/}}
{{- define "celery-events-exporter.exporterFullname" -}}
{{- $fullname := include "celery-events-exporter.fullname" . }}
{{- if .Values.exporterName }}
{{- printf "%s-%s" $fullname .Values.exporterName | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $fullname }}
{{- end }}
{{- end }}
